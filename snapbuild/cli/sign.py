"""``snapbuild sign``: sign a snapshot in a registry."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json, json_option, registry_option


@click.command()
@click.argument("ref")
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The private key (from `snapbuild keygen`).")
@registry_option
@click.option("--allow-untrusted-cache", is_flag=True,
              help="Sign even when steps of the snapshot came from a remote build cache without --cache-trust "
                   "(the build warned, and its config records them).")
@json_option
def sign(ref, key_path, registry, allow_untrusted_cache, as_json):
    """Sign snapshot REF in a registry with an ed25519 key.

    The signature is stored beside the snapshot, as an OCI referrer of its manifest
    (with the OCI 1.1 fallback tag `sha256-<hex>` for registries without the referrers
    API). Nodes check it with `snapbuild-runner restore --trust-policy FILE`.

    Refuses (exit 10) a snapshot with steps taken from a remote build cache that
    nothing verified (`build --cache-from` without `--cache-trust`): whoever can write
    that cache chose them, and a signature would make nodes trust them.
    """
    from ..registry import default_registry_url, locate, open_registry, parse_ref
    from ..signing import sign_snapshot
    from ..store import Store

    ref, registry = locate(ref, registry)
    out = sign_snapshot(open_registry(registry or default_registry_url(Store().home)), parse_ref(ref),
                        Path(key_path), allow_unverified_cache=allow_untrusted_cache)
    if out["unverified_cache"]:
        names = ", ".join(s.get("name", "?") for s in out["unverified_cache"])
        click.echo(f"warning: signed anyway (--allow-untrusted-cache): steps {names} came from a remote build "
                   "cache that nothing verified; nodes that trust this key will run them", err=True)
    if as_json:
        emit_json(out)
        return
    click.echo(f"signed {out['ref']} ({out['digest'][:19]}) with key {out['key_id'][:19]}: signature "
               f"{out['signature'][:19]} in {out['registry']}")
