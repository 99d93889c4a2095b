"""``snapbuild rm``: remove a tag (or a manifest's tags) from a registry."""

from __future__ import annotations

import click

from .common import emit_json, json_option, registry_option


@click.command(name="rm")
@click.argument("ref")
@registry_option
@json_option
def remove(ref, registry, as_json):
    """Remove tag NAME:TAG (or with NAME@sha256:..., the tags of that manifest) from a
    registry. On oci:// the manifest itself is deleted, with every tag that names it
    (the distribution API deletes by digest). Blobs stay until the registry's own
    garbage collection (`snapbuild cache gc` for the local one)."""
    from ..registry import default_registry_url, locate, open_registry, parse_ref
    from ..store import Store

    ref, registry = locate(ref, registry)
    reg = open_registry(registry or default_registry_url(Store().home))
    r = parse_ref(ref)
    digest = reg.resolve(r)
    reg.delete(r)
    if as_json:
        emit_json({"removed": str(r), "digest": digest, "registry": reg.url})
        return
    click.echo(f"removed {r} ({digest[:19]}) from {reg.url}")
