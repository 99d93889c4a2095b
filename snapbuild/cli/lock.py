"""``snapbuild lock``: check RECIPE.lock, or refresh it with --update."""

from __future__ import annotations

import sys

import click

from .common import emit_json, json_option, set_option


@click.command(name="lock")
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--update", is_flag=True, help="Write what the references resolve to now into RECIPE.lock.")
@json_option
def lock_cmd(recipe, sets, update, as_json):
    """Check RECIPE.lock against what the recipe's floating references (Hub revisions,
    S3 objects, image tags) resolve to now; with --update, refresh it.

    Exits 3 when the lock file is out of date (without --update), as `build --locked`
    does. `build` writes the lock file after every successful build.
    """
    from .. import lock
    from ..build import plan as make_plans
    from ..recipe import parse_sets

    plans = make_plans(recipe, sets=parse_sets(sets))
    current = {p.recipe.build_id: lock.entries(p) for p in plans}
    drift = {b: lock.drift(recipe, b, e) for b, e in current.items()}
    changed = lock.write(recipe, current) if update else False
    if as_json:
        emit_json({"lock_file": str(lock.lock_path(recipe)), "drift": drift, "updated": changed})
    else:
        for b, lines in drift.items():
            for line in lines:
                click.echo(f"{b}: {line}")
        if update:
            click.echo(f"{'updated' if changed else 'up to date:'} {lock.lock_path(recipe)}")
        elif not any(drift.values()):
            click.echo(f"up to date: {lock.lock_path(recipe)}")
    if not update and any(drift.values()):
        sys.exit(lock.LockDrift.exit_code)
