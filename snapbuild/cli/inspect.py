"""``snapbuild inspect``: a snapshot's outputs, sizes and step keys."""

from __future__ import annotations

import click

from .common import emit_json, human_size, json_option, registry_option


@click.command()
@click.argument("ref")
@registry_option
@json_option
def inspect(ref, registry, as_json):
    """Show a snapshot: its outputs, sizes, and the step keys it was built from."""
    from ..inspect import inspect_snapshot

    info = inspect_snapshot(ref, registry)
    if as_json:
        emit_json(info)
        return
    click.echo(f"{info['ref']}  {info['digest']}")
    click.echo(f"  recipe {info['name']}" + (f" {info['variant']}" if info["variant"] else ""))
    click.echo(f"  {info['blobs']} blobs, {human_size(info['stored_bytes'])} stored, "
               f"{human_size(info['content_bytes'])} of content")
    ck = info.get("checkpoint")
    if ck:
        from ..steps.checkpoint import ANON_TIP_BYTES

        anon = ck.get("anonymous_bytes", 0)
        share = f" ({ck['anonymous_share']:.0%} of its resident memory)" if ck.get("anonymous_share") is not None else ""
        click.echo(f"  checkpoint: {human_size(ck.get('pages_bytes', 0))} of memory pages")
        click.echo(f"    anonymous memory {human_size(anon):>10}  in the checkpoint{share}")
        click.echo(f"    file-backed      {human_size(ck.get('file_backed_bytes', 0)):>10}  left out: mapped files, "
                   "mapped again from the same paths on restore")
        if anon > ANON_TIP_BYTES:
            click.echo("    tip: if weights are in the anonymous memory, memory-map them from a mounted input "
                       "(docs/recipes.md, \"Small checkpoints\")")
    if info.get("secret_env"):
        click.echo(f"  warning: the warm-up's env or command has {', '.join(info['secret_env'])}, which look like "
                   "secrets: they are in the snapshot, and the checkpoint holds the server's memory "
                   "(docs/recipes.md, \"Secrets\")")
    if info.get("env_from_node"):
        click.echo(f"  env from the node: {', '.join(info['env_from_node'])} (values from the runner's environment "
                   "at each start, never in the snapshot)")
    click.echo("  outputs:")
    for o in info["outputs"]:
        click.echo(f"    {o['step']:<16} {o['files']:>5} files {human_size(o['bytes']):>10}  {o['tree'][:19]}")
    if info.get("tree_images"):
        click.echo("  tree images (mounted by nodes that can, instead of writing the files out):")
        for t in info["tree_images"]:
            click.echo(f"    {t['kind']:<6} {t['of'][:19]}  {t['format']} image {t['image'][:19]}")
    click.echo("  steps:")
    for s in info["steps"]:
        click.echo(f"    {s['name']:<16} {s['kind']:<10} {s['key'][:12]}")
