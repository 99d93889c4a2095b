"""``snapbuild-runner gc``: free what no pinned snapshot of a store uses, on the node
layout of :mod:`.layout` (its locks taken in the order drawn there)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import SnapbuildError
from ..rootfs import release_layer
from ..schema import Runtime, SchemaError
from ..store import Store
from ..store.fsutil import flock, walk
from . import layout, mounts
from .container import read_image
from .trees import release


def node_gc(store: Store | None = None, *, dry_run: bool = False) -> dict:
    """Free what no pinned snapshot of this store uses: the input trees and checkpoint
    images this store wrote out (under the run root and the image cache), and its
    unreferenced blobs. A tree that another store on this node also uses stays until
    that store lets it go too. Trees of running servers belong to pinned snapshots.
    Mount points of host servers (``mounts:``) that no running server uses go first."""
    store = store or Store()
    keep: set[Path] = set()
    roots = {layout.run_root(), layout.images_root(layout.run_root())}
    for path in store.pin_files():
        runtime = _pinned_runtime(store, path)
        if runtime is None:
            continue
        spec = runtime.server
        root, images = Path(spec.run_root), layout.images_root(spec.run_root)
        roots |= {root, images}
        keep |= {layout.tree_dir(root, d) for d in spec.inputs.values()}
        if runtime.artifact:
            keep.add(layout.tree_dir(images, runtime.artifact))
        if spec.image is not None:  # a container's layers, unpacked under the run root
            try:
                layers = read_image(store.blobs, spec.image)[0]["layers"]
            except (SnapbuildError, OSError, ValueError, KeyError):
                layers = []
            keep |= {layout.layer_cache(root) / layout.hex_of(x["digest"]) for x in layers}
    if not dry_run:  # host servers' `mounts:` that no server of this node uses any more
        for root in {layout.run_root(), *(r for r in roots if (r / "trees").is_dir())}:
            mounts.release(root)
    removed, freed = 0, 0
    in_use: list[str] = []  # trees and layers mounted from images that a process still uses
    for root in roots:
        trees = layout.trees_dir(root)
        for p in sorted(trees.glob("*")) if trees.is_dir() else []:
            if p in keep or p.name.endswith((".partial", ".users")):
                continue
            size = _du(p)
            try:
                gone = release(p, store.home, dry_run=dry_run, before=_unmount_views)
            except SnapbuildError:  # an image mount a process still uses: next time
                in_use.append(str(p))
                continue
            if gone:
                removed += 1
                freed += size
    for root in roots:
        cache = layout.layer_cache(root)
        for marker in sorted(cache.glob(f"*{layout.LAYER_MARKER}")) if cache.is_dir() else []:
            p = cache / marker.name[: -len(layout.LAYER_MARKER)]
            if p in keep:
                continue
            size = _du(p)
            try:
                gone = release_layer(cache, p.name, str(store.home), dry_run=dry_run)
            except SnapbuildError:
                in_use.append(str(p))
                continue
            if gone:
                removed += 1
                freed += size
        # Image files that no mounted tree or layer uses (a write-out cut short).
        images = layout.image_files(root)
        for p in sorted(images.iterdir()) if images.is_dir() and not dry_run else []:
            hexpart = p.name.split(".", 1)[0]
            # (under both locks that a write-out takes, in order: one going on is left alone)
            with flock(layout.tree_lock(root, hexpart)), flock(layout.layer_lock(cache, hexpart)):
                tree = layout.trees_dir(root) / hexpart
                if not (layout.tree_users(tree).exists() or layout.layer_marker(cache, hexpart).exists()) \
                        and p.exists():
                    freed += p.stat().st_size
                    p.unlink()
    rep = store.gc(dry_run=dry_run)
    return {"trees_removed": removed, "tree_bytes_freed": freed, "blobs_removed": rep.blobs_removed,
            "blob_bytes_freed": rep.bytes_freed, "dry_run": dry_run, "in_use": in_use}


def _pinned_runtime(store: Store, pin: Path) -> Runtime | None:
    """The runtime section of a pinned snapshot; None when it has none or cannot be read
    (then nothing is kept for it: gc never fails on one bad pin)."""
    try:
        manifest = json.loads(store.blobs.get(json.loads(pin.read_text())["manifest"]))
        doc = json.loads(store.blobs.get(manifest["config"]["digest"])).get("runtime")
        return Runtime.from_json(doc) if doc else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SchemaError, SnapbuildError):
        return None


def _unmount_views(tree: Path) -> None:
    """A host server's `mounts:` show trees at fixed paths: they go with the tree."""
    for point in mounts.mount_points_of(tree):
        mounts.unmount(point)


def _du(path: Path) -> int:
    """Bytes of the regular files under ``path``; symbolic links are not followed."""
    total = 0
    for dirpath, _dirs, files in walk(path):  # no recursion: a tree may be deep
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total
