"""``snapbuild bench``: cold boot versus restore, medians and ratio."""

from __future__ import annotations

import click

from .common import emit_json, json_option, registry_option


@click.command(name="bench")
@click.argument("ref")
@registry_option
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Runs of each mode (cold boot, restore), alternated.")
@click.option("--drop-caches/--no-drop-caches", default=None,
              help="Also measure with the page cache dropped before every run (default: when root).")
@json_option
def bench_snapshot(ref, registry, runs, drop_caches, as_json):
    """Cold boot to ready versus restore to ready, medians and ratio.

    Both modes start the same server from the same snapshot, and each server is asked
    the snapshot's check requests (`verify:` of its checkpoint step), whose answers must
    be the warm-up's; without any, nothing is compared and the report says so. The port
    must be free.
    """
    from ..runner.bench import bench

    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    r = bench(ref, runs=runs, registry=registry, drop=drop_caches, progress=say)
    if as_json:
        emit_json(r)
        return
    click.echo(f"{ref}: {runs} runs per mode, alternated; seconds from runner start to ready")
    click.echo(f"  {'page cache':<12} {'cold median':>12} {'restore median':>15} {'speedup':>8}")
    for label, phase in (("warm", r["warm"]), ("dropped", r["page_cache_dropped"])):
        if phase:
            click.echo(f"  {label:<12} {phase['cold_s']['median']:>12.3f} {phase['restore_s']['median']:>15.3f} "
                       f"{phase['speedup']:>7.1f}x")
    own = r["warm"].get("overhead")
    if own:
        share = f" ({own['share_of_criu']:.0%} of it)" if own["share_of_criu"] is not None else ""
        click.echo(f"  a warm restore's own overhead (all but CRIU and the first probe): {own['own_s']:.3f}s; "
                   f"CRIU {own['criu_s']:.3f}s{share}")
    click.echo(f"  first restore on this node (writes the images out): {r['restore_first_s']:.3f}s")
    click.echo(f"  answers: {_bench_answers(r['answers'])}")
    if r.get("verify"):
        click.echo("  check requests after each restore: "
                   + ", ".join(f"{n} {how}" for how, n in sorted(r["verify"].items())))
    if r.get("note"):
        click.echo(f"  note: {r['note']}")


def _bench_answers(a: dict) -> str:
    """The bench report's ``answers``, in words."""
    if a["compared"] is None:
        return f"not compared ({a['why']})"
    if a["same"]:
        return f"the warm-up's, from every server ({a['compared']}, {a['asked']} servers asked)"
    return (f"DIFFERENT from the warm-up's on {a['different']} of {a['asked']} servers ({a['compared']}); "
            f"first: {a['first_difference']}")
