"""Input trees (code, dependencies, weights) materialized once per machine at
content-addressed paths: ``$RUN_ROOT/trees/<hex>/``.

The warm process sees its inputs there on the build machine, and the runner puts the
same bytes at the same path on every node. That is what lets CRIU leave unmodified
file-backed pages (mapped weights, shared libraries) out of the checkpoint, and what
lets many snapshots share one copy of their weights per node.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..store.blobs import BlobStore
from ..store.fsutil import flock
from ..store.tree import load_tree, materialize

MARKER = ".snapbuild-complete"


def tree_dir(root: Path, digest: str) -> Path:
    return root / "trees" / digest.split(":", 1)[1]


def ensure_tree(blobs: BlobStore, digest: str, root: Path) -> tuple[Path, bool]:
    """The tree's folder, materialized (verified) if not there yet. Returns (path, created)."""
    final = tree_dir(root, digest)
    if (final / MARKER).exists():
        return final, False
    with flock(root / "locks" / f"tree-{digest.split(':', 1)[1]}.lock"):
        if (final / MARKER).exists():
            return final, False
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete earlier attempt
        materialize(blobs, load_tree(blobs, digest), tmp)
        (tmp / MARKER).touch()
        os.rename(tmp, final)  # only complete trees appear under their name
    return final, True


def link_inputs(inputs: dict[str, Path], dest: Path) -> None:
    """``dest/<step>`` -> the tree folder: the names a command uses for its inputs."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, path in inputs.items():
        link = dest / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(path, link)


def link_farm(src: Path, dest: Path) -> dict[str, tuple[int, int, int]]:
    """Recreate the tree at ``src`` under ``dest`` with real folders and hard-linked
    files (a copy where linking is impossible), so that a command sees ordinary files
    (``cp -r`` copies them) without gigabytes being copied for every step.

    Returns each linked file's (size, mtime_ns, mode), so :func:`modified` can tell
    whether the command wrote to a shared file in place.
    """
    sigs: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out = dest if rel == "." else dest / rel
        out.mkdir(parents=True, exist_ok=True)
        for name in dirnames:
            s = os.path.join(dirpath, name)
            if os.path.islink(s):
                os.symlink(os.readlink(s), out / name)
        for name in filenames:
            if rel == "." and name == MARKER:
                continue
            s = os.path.join(dirpath, name)
            if os.path.islink(s):
                os.symlink(os.readlink(s), out / name)
                continue
            try:
                os.link(s, out / name)
                st = os.stat(s)
                sigs[s] = (st.st_size, st.st_mtime_ns, st.st_mode)
            except OSError:
                shutil.copy2(s, out / name)
    return sigs


def modified(sigs: dict[str, tuple[int, int, int]]) -> list[str]:
    """Shared files whose content or mode changed since :func:`link_farm`."""
    out = []
    for path, sig in sigs.items():
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append(path)
            continue
        if (st.st_size, st.st_mtime_ns, st.st_mode) != sig:
            out.append(path)
    return out


def discard(path: Path) -> None:
    """Forget a materialized tree (it will be written out again when next needed)."""
    marker = path / MARKER
    marker.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
