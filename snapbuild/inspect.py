"""Read-only views of the store and registries, for ``ls``, ``inspect`` and ``cache ls``."""

from __future__ import annotations

import json

from .registry import default_registry_url, open_registry, parse_ref
from .schema import secret_names
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
    store = store or Store()
    reg = open_registry(registry or default_registry_url(store.home))
    ref = parse_ref(text)
    digest = reg.resolve(ref)
    manifest = parse_manifest(reg.get_manifest(ref.name, digest), digest)
    config = json.loads(reg.get_blob(ref.name, manifest["config"]["digest"]))
    outputs = []
    content = 0
    for step, tree_digest in config["outputs"].items():
        tree = json.loads(reg.get_blob(ref.name, tree_digest))  # verified, with the registry's own hint
        size = tree_size(tree)
        content += size
        outputs.append({"step": step, "tree": tree_digest, "bytes": size,
                        "files": sum(1 for e in tree["entries"] if e["type"] == "file")})
    return {
        "ref": str(ref), "digest": digest, "name": config["name"], "variant": config["variant"],
        "outputs": outputs, "steps": config["steps"], "created_by": config.get("created_by"),
        "blobs": 1 + len(manifest["layers"]),
        "stored_bytes": manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"]),
        "content_bytes": content, "manifest": manifest,
        "checkpoint": _checkpoint_stats((config.get("runtime") or {}).get("stats")),
        "tree_images": _tree_images(config.get("tree_images")),
        "secret_env": secret_names(((config.get("runtime") or {}).get("server") or {}).get("env") or {}),
    }


def _tree_images(images: dict | None) -> list[dict]:
    """Each tree or layer shipped as an image too (docs/format.md, Tree images)."""
    if not images:
        return []
    out = []
    for kind in ("trees", "layers"):
        for of, image in (images.get(kind) or {}).items():
            out.append({"of": of, "kind": kind[:-1], "image": image, "format": images.get("format")})
    return out


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
