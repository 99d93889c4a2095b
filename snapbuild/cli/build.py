"""``snapbuild build``: run what is not cached, assemble and publish the snapshot."""

from __future__ import annotations

import sys

import click

from ..errors import exit_codes_help
from .common import (OFFLINE_HELP, emit_json, human_size, json_option, progress_option, registry_option, render_error,
                     set_option)


@click.command(epilog="\b\n" + exit_codes_help((0, 2, 3, 4, 5, 6, 7, 130)))
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--tag", metavar="NAME:TAG", help="Publish the snapshot under this tag (default: the recipe's `publish.tag`).")
@registry_option
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=2, show_default=True,
              help="How many independent steps run at once.")
@click.option("-k", "--keep-going", is_flag=True, help="After a failure, finish the steps that do not depend on it.")
@progress_option
@click.option("--push", "push_to", metavar="URL", multiple=True,
              help="After publishing, push the snapshot to this registry too (repeatable).")
@click.option("--cache-from", metavar="URL", multiple=True,
              help="Look up step results in this registry before running a step (repeatable; first hit wins). "
                   "Without --cache-trust, a result taken from it is named in a warning and recorded in the "
                   "snapshot, which `snapbuild sign` then refuses.")
@click.option("--cache-to", metavar="URL", multiple=True,
              help="Send the step results of this build to this registry's cache (repeatable).")
@click.option("--sign-key", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Sign each step result --cache-to sends with this private key (snapbuild keygen).")
@click.option("--cache-trust", metavar="PUBKEY", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Take from --cache-from only entries signed by this public key (repeatable): a job that can "
                   "write the cache cannot then poison this build.")
@click.option("--locked", is_flag=True,
              help="Refuse to build when a floating reference (Hub revision, S3 object, image tag) resolves "
                   "differently from RECIPE.lock.")
@click.option("--offline", is_flag=True, help=OFFLINE_HELP)
@json_option
def build(recipe, sets, tag, registry, jobs, keep_going, progress, push_to, cache_from, cache_to, sign_key,
          cache_trust, locked, offline, as_json):
    """Build a recipe: run what is not cached, then assemble and publish the snapshot."""
    from ..build import build as run_build
    from ..errors import BuildFailed
    from ..exec.report import make_reporter
    from ..recipe import parse_sets

    results = run_build(recipe, sets=parse_sets(sets), jobs=jobs, keep_going=keep_going, tag=tag,
                        registry=registry, reporter=make_reporter(progress), locked=locked, push=push_to,
                        cache_from=cache_from, cache_to=cache_to, sign_key=sign_key, cache_trust=cache_trust,
                        offline=offline)
    if as_json:
        if len(results) == 1:
            emit_json(results[0].to_json())
        else:
            emit_json({"builds": [{"name": r.build_id, **r.to_json()} for r in results]})
    else:
        for r in results:
            counts = {}
            for s in r.steps.values():
                counts[s.status] = counts.get(s.status, 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            click.echo(f"{r.build_id}: {summary} in {r.duration_s:.2f}s")
            if r.snapshot:
                click.echo(f"  snapshot {r.snapshot}")
            if r.tag:
                click.echo(f"  published {r.tag} to {r.registry}")
            for p in r.pushed:
                click.echo(f"  pushed to {p['registry']}: {p['blobs_sent']} of {p['blobs']} blobs sent, "
                           f"{human_size(p['bytes_sent'])}")
    failed = [f"{r.build_id}/{n}" for r in results for n in r.failed]
    if failed or not all(r.ok for r in results):
        err = BuildFailed(f"build failed: {', '.join(failed) or 'steps were skipped'}",
                          hint=f"see a step's full log with: snapbuild logs {recipe} STEP")
        codes = {r.steps[n].exit_code for r in results for n in r.failed}
        if codes == {7}:  # every failure was a source that cannot be reached
            err.exit_code = 7
        click.echo(render_error(err), err=True)
        sys.exit(err.exit_code)
