"""Artifacts as trees: a JSON blob that lists paths with their mode and chunks.

A tree is what a step produces and what a snapshot ships::

    {"mediaType": "application/vnd.snapbuild.tree.v1+json",
     "entries": [
        {"path": "bin", "type": "dir", "mode": 493},
        {"path": "bin/run.sh", "type": "file", "mode": 493, "size": 120,
         "digest": "sha256:...", "chunks": [...]},
        {"path": "current", "type": "symlink", "target": "bin"}]}

A file's ``digest`` is the sha256 of its whole content (its chunks name stored bytes).
Entries are sorted by path and the blob is canonical JSON, so the same content always
gives the same tree digest. Times and owners are deliberately not recorded: they would
make identical outputs differ.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from ..errors import IntegrityError
from .blobs import BlobStore
from .chunks import Packer, chunk_digests, put_stream, write_file
from .fsutil import ParallelWrites, canonical_json

MEDIA_TYPE = "application/vnd.snapbuild.tree.v1+json"


def _check_relpath(rel: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel in ("", "."):
        raise IntegrityError(f"tree entry {rel!r} is not a safe relative path")
    return p.as_posix()


def walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Every path below ``root`` (directories, files, symlinks) as (relpath, abspath)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in dirnames + sorted(filenames):
            full = base / name
            yield full.relative_to(root).as_posix(), full


def build_tree(blobs: BlobStore, items: Iterable[tuple[str, Path]]) -> tuple[str, dict]:
    """Store the given (relpath, abspath) items and return (tree digest, tree).

    Parent directories of listed paths are added implicitly. Small files are packed
    (see chunks.Packer), in the order given.
    """
    entries: dict[str, dict] = {}
    packer = Packer(blobs)
    for rel, src in items:
        rel = _check_relpath(rel)
        parts = PurePosixPath(rel).parts
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, {"path": parent, "type": "dir", "mode": 0o755})
        st = os.lstat(src)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            entries[rel] = {"path": rel, "type": "symlink", "target": os.readlink(src)}
        elif stat.S_ISDIR(st.st_mode):
            entries[rel] = {"path": rel, "type": "dir", "mode": mode}
        elif stat.S_ISREG(st.st_mode):
            with open(src, "rb") as f:
                chunks, digest = put_stream(blobs, f, packer=packer)
            entries[rel] = {"path": rel, "type": "file", "mode": mode, "digest": digest,
                            "size": sum(c["size"] for c in chunks), "chunks": chunks}
        # sockets, fifos and devices have no place in an artifact: skipped
    packer.flush()
    tree = {"mediaType": MEDIA_TYPE, "entries": [entries[k] for k in sorted(entries)]}
    return blobs.put(canonical_json(tree)), tree


def load_tree(blobs: BlobStore, digest: str) -> dict:
    import json

    tree = json.loads(blobs.get(digest))
    if tree.get("mediaType") != MEDIA_TYPE:
        raise IntegrityError(f"blob {digest} is not a snapbuild tree")
    return tree


def tree_blobs(tree: dict) -> Iterator[str]:
    """Digests of every chunk and pack blob a tree refers to, each once."""
    seen = set()
    for e in tree["entries"]:
        if e["type"] == "file":
            for d in chunk_digests(e["chunks"]):
                if d not in seen:
                    seen.add(d)
                    yield d


def tree_size(tree: dict) -> int:
    return sum(e.get("size", 0) for e in tree["entries"])


def materialize(blobs: BlobStore, tree: dict, dest: Path) -> None:
    """Write a tree out under ``dest`` (created if needed), verifying every chunk."""
    dest.mkdir(parents=True, exist_ok=True)
    dirs = []
    with ParallelWrites() as writes:  # files on a few threads: creating files is mostly waiting
        for e in tree["entries"]:
            target = dest / _check_relpath(e["path"])
            if e["type"] == "dir":
                target.mkdir(parents=True, exist_ok=True)
                dirs.append((target, e["mode"]))
            elif e["type"] == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                writes.submit(target, lambda e=e, target=target: write_file(blobs, e, target))
            elif e["type"] == "symlink":
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(e["target"], target)
    # Directory modes last, so a read-only directory does not block its own contents.
    for target, mode in reversed(dirs):
        os.chmod(target, mode)
