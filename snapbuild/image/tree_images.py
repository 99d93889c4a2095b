"""Which trees of a snapshot get a tree image, made at build time (see
:mod:`snapbuild.runtime.erofs` for what tree images are and how a node mounts them).

Images are made for input trees and container layers with many files (at least
``MIN_ENTRIES``), once per tree, and remembered in the store's cache
(``cache/tree-images/<hex>.json``, a tree with too few files too).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..errors import SnapbuildError
from ..runtime.container import layer_dirs, read_image
from ..runtime.erofs import FILE, FORMAT, MIN_ENTRIES, can_build, compression, enabled, make
from ..runtime.layout import TREE_MARKER, layer_cache
from ..runtime.trees import ensure_tree
from ..schema import Runtime, TreeImages
from ..store.fsutil import atomic_write_json, read_json
from ..store.tree import build_tree, load_tree, tree_blobs


def for_snapshot(store, runtime: Runtime | None, say=lambda text: None) -> TreeImages | None:
    """Images for a snapshot's input trees and container layers with many files (made
    once per tree and kept in the store's cache), as the config's ``tree_images``; None
    when there are none or ``mkfs.erofs`` is missing (the snapshot works without).
    ``say`` hears of each image made and of a missing mkfs.erofs."""
    if runtime is None:
        return None
    if not can_build():
        if enabled():
            say("tree images: none (mkfs.erofs is not installed: `apt-get install erofs-utils`); "
                "nodes will write the trees out file by file")
        return None
    spec = runtime.server
    root = Path(spec.run_root)

    def tree_image(digest: str, out: Path) -> bool:
        if len(load_tree(store.blobs, digest)["entries"]) < MIN_ENTRIES:
            return False
        make(ensure_tree(store.blobs, digest, root)[0], out, exclude=(TREE_MARKER,))
        return True

    trees = {d: _cached(store, d, lambda out, d=d: tree_image(d, out), say)
             for d in dict.fromkeys(spec.inputs.values())}
    layers: dict[str, str | None] = {}
    image = spec.image
    if image is not None:
        dirs: list[Path] = []

        def layer_image(i: int, out: Path) -> bool:
            if not dirs:  # unpacked (on a machine that has not yet) only when an image is made
                dirs.extend(layer_dirs(store.blobs, image, layer_cache(root)))
            if _count(dirs[i]) < MIN_ENTRIES:
                return False
            make(dirs[i], out, keep_owners=True)
            return True

        for i, layer in enumerate(read_image(store.blobs, image)[0]["layers"]):
            layers[layer["digest"]] = _cached(store, layer["digest"], lambda out, i=i: layer_image(i, out), say)
    trees_with = {k: v for k, v in trees.items() if v}
    layers_with = {k: v for k, v in layers.items() if v}
    if not trees_with and not layers_with:
        return None
    return TreeImages(trees=trees_with, layers=layers_with)


def _count(path: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))


def _cached(store, digest: str, make_image, say) -> str | None:
    """The image tree of ``digest``: from the store's cache, else made by
    ``make_image(file)`` and stored as a one-file tree. None when ``make_image``
    declines (too few files to gain anything): remembered too."""
    entry = store.home / "cache" / "tree-images" / f"{digest.split(':', 1)[1]}.json"
    try:
        cached = read_json(entry)
        image = cached["image"]
        if cached.get("compression", "none") != compression():
            raise ValueError("made with another compression")
        if image is None or (store.blobs.has(image)
                             and all(store.blobs.has(d) for d in tree_blobs(load_tree(store.blobs, image)))):
            return image
    except (OSError, ValueError, KeyError, SnapbuildError):
        pass
    work = store.scratch("tree-image-")
    t = time.monotonic()
    try:
        image = build_tree(store.blobs, [(FILE, work / FILE)])[0] if make_image(work / FILE) else None
        if image is not None:
            say(f"tree image of {digest[:19]} made: {(work / FILE).stat().st_size / (1 << 20):.1f} MiB "
                f"in {time.monotonic() - t:.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(entry, {"tree": digest, "format": FORMAT, "compression": compression(), "image": image},
                      tmp_dir=store.home / "tmp")
    return image
