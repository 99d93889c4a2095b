"""``snapbuild plan``: each step's key, whether it runs or is cached, and why."""

from __future__ import annotations

import click

from .common import OFFLINE_HELP, emit_json, json_option, set_option


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--offline", is_flag=True, help=OFFLINE_HELP)
@json_option
def plan(recipe, sets, offline, as_json):
    """Show each step's key, whether it runs or is cached, and why it runs.

    \b
    Reasons name the first thing that differs from the step's last build:
      never built | spec.run changed | files changed: app.py | input src changed
    """
    from ..build import plan as make_plans
    from ..plan import short
    from ..recipe import parse_sets

    plans = make_plans(recipe, sets=parse_sets(sets), offline=offline)
    if as_json:
        if len(plans) == 1:
            emit_json(plans[0].to_json())
        else:
            emit_json({"builds": [{"name": p.recipe.build_id, "variant": p.recipe.variant, **p.to_json()} for p in plans]})
        return
    for p in plans:
        n_run = len(p.to_run)
        click.echo(f"{p.recipe.build_id}: {len(p.steps)} steps, {n_run} to run, {len(p.steps) - n_run} cached")
        rows = [(s.name, s.kind, short(s.key), s.action, s.reason) for s in p.steps.values()]
        widths = [max(len(r[i]) for r in rows + [("STEP", "KIND", "KEY", "ACTION", "")]) for i in range(4)]
        click.echo("  " + "  ".join(h.ljust(w) for h, w in zip(("STEP", "KIND", "KEY", "ACTION"), widths, strict=True)) + "  WHY")
        for r in rows:
            click.echo("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[4])
