"""``snapbuild pull``: fetch a snapshot into the local store and registry."""

from __future__ import annotations

import click

from .common import emit_json, human_size, json_option, progress_option, registry_option, transfer_display


@click.command()
@click.argument("ref")
@registry_option
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=16, show_default=True,
              help="Blobs in flight at once.")
@progress_option
@json_option
def pull(ref, registry, jobs, progress, as_json):
    """Fetch snapshot REF from --registry into the local store and tag it in the local
    registry, so that `snapbuild run REF` and `inspect REF` work here without --registry.

    Every blob is checked against its digest; what the store already holds is not
    fetched again.
    """
    from ..registry import default_registry_url, locate, open_registry, parse_ref
    from ..registry.transfer import copy
    from ..store.snapshot import check_snapshot
    from ..store import Store

    store = Store()
    ref, registry = locate(ref, registry)
    r = parse_ref(ref)
    local = default_registry_url(store.home)
    with store.using(), transfer_display(progress, as_json) as show:
        out = copy(open_registry(registry or local), r, open_registry(local), r, store.blobs, jobs=jobs,
                   progress=show,
                   check=lambda manifest: check_snapshot(store.blobs, manifest, str(r)))
    if as_json:
        emit_json(out)
        return
    click.echo(f"pulled {out['ref']} ({out['digest'][:19]}): {out['blobs_fetched']} blobs fetched, "
               f"{human_size(out['bytes_fetched'])}")
