"""``snapbuild push``: copy a snapshot to another registry."""

from __future__ import annotations

import click

from .common import emit_json, human_size, json_option, progress_option, registry_option, transfer_display


@click.command()
@click.argument("ref")
@click.argument("dest", metavar="DEST")
@click.option("--as", "as_ref", metavar="NAME:TAG", help="Name and tag at the destination (default: the same as REF; "
              "or give DEST as a full reference).")
@registry_option
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=8, show_default=True,
              help="Blobs in flight at once.")
@progress_option
@json_option
def push(ref, dest, as_ref, registry, jobs, progress, as_json):
    """Copy snapshot REF from the local registry (or --registry) to DEST: a registry
    URL (the snapshot keeps its name and tag there), or a full reference that names
    the repository and tag to push to.

    Only the blobs DEST lacks are sent, in parallel, each checked against its
    digest; the tag is written last, so a push that is interrupted shows nothing at
    the destination, and running it again sends what is still missing.

    \b
      snapbuild push torch-mlp:dev oci://registry.example:5000/snapshots
      snapbuild push torch-mlp:dev oci://registry.example:5000/team/torch-mlp:v2
      snapbuild push torch-mlp:dev s3://my-bucket/snapshots --s3-endpoint http://127.0.0.1:9000
    """
    from ..errors import UsageError
    from ..registry import default_registry_url, locate, open_registry, parse_ref
    from ..registry.ref import names_a_snapshot, split_full
    from ..registry.transfer import copy
    from ..store import Store

    store = Store()
    ref, registry = locate(ref, registry)
    src_ref = parse_ref(ref)
    full = split_full(dest) if names_a_snapshot(dest) else None
    if full:
        if as_ref:
            raise UsageError(f"DEST {dest} names the tag to push to already: leave out --as {as_ref}")
        dest, as_ref = full
    with store.using(), transfer_display(progress, as_json) as show:
        out = copy(open_registry(registry or default_registry_url(store.home)), src_ref, open_registry(dest),
                   parse_ref(as_ref) if as_ref else src_ref, store.blobs, jobs=jobs, progress=show)
    if as_json:
        emit_json(out)
        return
    mounted = f" ({out['blobs_mounted']} mounted from other repositories)" if out["blobs_mounted"] else ""
    click.echo(f"pushed {out['ref']} ({out['digest'][:19]}) to {out['registry']}: {out['blobs_sent']} of "
               f"{out['blobs']} blobs sent{mounted}, {human_size(out['bytes_sent'])}, in {out['seconds']:.2f}s")
