"""Read-only views of the store and registries, for ``ls``, ``inspect`` and ``cache ls``."""

from __future__ import annotations

import json

from .errors import IntegrityError
from .registry import default_registry_url, locate, open_registry, parse_ref
from .schema import SnapshotConfig, TreeImages, secret_names
from .signing import is_referrers_tag
from .store import Store
from .store.snapshot import parse_manifest
from .store.tree import load_tree, tree_size


def list_registry(registry: str | None = None, store: Store | None = None) -> list[dict]:
    store = store or Store()
    reg = open_registry(registry or default_registry_url(store.home))
    return [{"name": name, "tag": tag, "digest": digest}
            for name in reg.names() for tag, digest in reg.tagged(name) if not is_referrers_tag(tag)]


def inspect_snapshot(text: str, registry: str | None = None, store: Store | None = None) -> dict:
    text, registry = locate(text, registry)
    store = store or Store()
    reg = open_registry(registry or default_registry_url(store.home))
    ref = parse_ref(text)
    digest = reg.resolve(ref)
    manifest = parse_manifest(reg.get_manifest(ref.name, digest), digest)
    try:
        config = SnapshotConfig.from_json(json.loads(reg.get_blob(ref.name, manifest["config"]["digest"])))
    except ValueError:
        raise IntegrityError(f"snapshot {ref}: its config is not JSON") from None
    outputs = []
    content = 0
    for step, tree_digest in config.outputs.items():
        tree = json.loads(reg.get_blob(ref.name, tree_digest))  # verified, with the registry's own hint
        size = tree_size(tree)
        content += size
        outputs.append({"step": step, "tree": tree_digest, "bytes": size,
                        "files": sum(1 for e in tree["entries"] if e["type"] == "file")})
    return {
        "ref": str(ref), "digest": digest, "name": config.name, "variant": config.variant,
        "outputs": outputs, "steps": config.steps, "created_by": config.created_by,
        "blobs": 1 + len(manifest["layers"]),
        "stored_bytes": manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"]),
        "content_bytes": content, "manifest": manifest,
        "checkpoint": _checkpoint_stats(config.runtime.stats if config.runtime else None),
        "tree_images": _tree_images(config.tree_images),
        # where the snapshot's server env and command look like they hold secrets (never the values)
        "secret_env": secret_names(config.runtime.server.env, config.runtime.server.argv) if config.runtime else [],
        "env_from_node": config.runtime.server.env_from_node if config.runtime else [],
    }


def _tree_images(images: TreeImages | None) -> list[dict]:
    """Each tree or layer shipped as an image too (docs/format.md, Tree images)."""
    if images is None:
        return []
    return [{"of": of, "kind": kind, "image": image, "format": images.format}
            for kind, index in (("tree", images.trees), ("layer", images.layers)) for of, image in index.items()]


def cache_entries(store: Store | None = None) -> list[dict]:
    store = store or Store()
    rows = []
    for key, data, mtime in store.refs():
        size = 0
        try:
            size = tree_size(load_tree(store.blobs, data["artifact"]))
        except Exception:  # a broken entry still gets listed; `cache verify` explains it
            pass
        rows.append({"key": key, "name": data.get("name", "?"), "kind": data.get("kind", "?"),
                     "artifact": data.get("artifact"), "bytes": size, "last_used": mtime})
    return sorted(rows, key=lambda r: -r["last_used"])


__all__ = ["cache_entries", "inspect_snapshot", "list_registry"]


def _checkpoint_stats(stats: dict | None) -> dict | None:
    """The checkpoint's figures, with the share of the server's resident memory that was
    anonymous (dumped) rather than file-backed (left out, mapped again on restore)."""
    if not stats:
        return None
    anon, files = stats.get("anonymous_bytes", 0), stats.get("file_backed_bytes", 0)
    return {**stats, "anonymous_share": round(anon / (anon + files), 4) if anon + files else None}
