"""``snapbuild keygen``: an ed25519 key pair for signing snapshots."""

from __future__ import annotations

import click

from .common import emit_json, json_option


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
@json_option
def keygen(path, as_json):
    """Make an ed25519 key pair for signing snapshots: PATH (private, mode 0600) and
    PATH.pub (public, for trust policies). Keep the private key in your CI's secrets."""
    from ..signing import key_id, keygen as make, load_public_key

    private, public = make(path)
    kid = key_id(load_public_key(public))
    if as_json:
        emit_json({"private_key": str(private), "public_key": str(public), "key_id": kid})
        return
    click.echo(f"wrote {private} (private) and {public} (public), key id {kid}")
