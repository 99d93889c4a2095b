"""``snapbuild ls``: the snapshots and tags in a registry."""

from __future__ import annotations

import click

from .common import emit_json, json_option, registry_option


@click.command(name="ls")
@registry_option
@json_option
def list_snapshots(registry, as_json):
    """List the snapshots and tags in a registry."""
    from ..inspect import list_registry

    rows = list_registry(registry)
    if as_json:
        emit_json({"snapshots": rows})
        return
    if not rows:
        click.echo("no snapshots (build one with: snapbuild build RECIPE --tag NAME:TAG)")
    for r in rows:
        click.echo(f"{r['name']}:{r['tag']}  {r['digest'][:19]}")
