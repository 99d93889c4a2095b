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
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path, PurePosixPath
from collections.abc import Iterable, Iterator

from ..errors import IntegrityError
from .blobs import BlobStore
from .chunks import CHUNK_SIZE, PACK_BELOW, Packer, chunk_digests, put_stream, write_fd
from .fsutil import ParallelWrites, canonical_json
from .securefs import Beneath, check_relpath, parents, safe_mode, unsafe_relpath

MEDIA_TYPE = "application/vnd.snapbuild.tree.v1+json"


def _check_relpath(rel: str) -> str:
    return check_relpath(rel)


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


def load_tree(blobs: BlobStore, digest: str, where: str | None = None) -> dict:
    """The tree blob ``digest``, checked by :func:`check_tree` (``where`` names it in
    errors: which snapshot and step it comes from)."""
    import json

    try:
        tree = json.loads(blobs.get(digest))
    except ValueError:
        raise IntegrityError(f"{where or 'tree'} {digest} is not JSON") from None
    check_tree(tree, f"{where or 'tree'} {digest}")
    return tree


_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_ENCODINGS = ("zstd", "raw", "zero")


def _int(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def tree_problem(tree: object) -> str | None:
    """What is wrong with a tree that came from elsewhere (None: nothing). Entries
    must be unique and sorted, of a known type, never below a file or a symlink; modes,
    sizes, chunk sizes and pack slices must add up."""
    if not isinstance(tree, dict) or tree.get("mediaType") != MEDIA_TYPE:
        return "is not a snapbuild tree"
    entries = tree.get("entries")
    if not isinstance(entries, list):
        return "has no list of entries"
    last = None
    leaves: set[str] = set()  # files and symlinks: nothing may be below them
    for e in entries:
        if not isinstance(e, dict):
            return "has an entry that is not an object"
        path = e.get("path")
        why = unsafe_relpath(path)
        if why:
            return f"entry {path!r} {why}"
        assert isinstance(path, str)
        if last is not None and path <= last:
            return f"entry {path!r} is {'a duplicate' if path == last else 'out of order'}"
        last = path
        above = next((p for p in parents(path) if p in leaves), None)
        if above is not None:
            return f"entry {path!r} is below {above!r}, which is not a folder"
        kind = e.get("type")
        if kind == "symlink":
            target = e.get("target")
            if not isinstance(target, str) or not target or "\0" in target or len(target) > 4096:
                return f"symlink {path!r} has no valid target"
            leaves.add(path)
            continue
        if kind not in ("dir", "file"):
            return f"entry {path!r} has an unknown type {kind!r}"
        if not _int(e.get("mode", 0o644), 0, 0o7777):
            return f"entry {path!r} has an invalid mode {e.get('mode')!r}"
        if kind == "dir":
            continue
        leaves.add(path)
        why = _file_problem(e)
        if why:
            return f"file {path!r} {why}"
    return None


def _file_problem(e: dict) -> str | None:
    if not isinstance(e.get("digest"), str) or not _DIGEST.match(e["digest"]):
        return "has no valid digest"
    chunks, size = e.get("chunks"), e.get("size")
    if not isinstance(chunks, list) or not _int(size, 0, 1 << 50):
        return "has no valid size or chunk list"
    total = 0
    for ref in chunks:
        if not isinstance(ref, dict) or ref.get("enc") not in _ENCODINGS:
            return "has a chunk of unknown encoding"
        if not _int(ref.get("size"), 1, CHUNK_SIZE):
            return f"has a chunk of size {ref.get('size')!r} (chunks hold 1 to {CHUNK_SIZE} bytes)"
        total += ref["size"]
        if ref["enc"] == "zero":
            continue
        if not isinstance(ref.get("digest"), str) or not _DIGEST.match(ref["digest"]):
            return "has a chunk with no valid digest"
        if "offset" in ref or "length" in ref:
            if len(chunks) != 1 or ref["size"] >= PACK_BELOW:
                return "has a packed chunk, but only a small file of one chunk is packed"
            if not _int(ref.get("offset"), 0, 1 << 40) or not _int(ref.get("length"), 1, PACK_BELOW):
                return "has a packed chunk with an invalid offset or length"
    if total != size:
        return f"has size {size}, but its chunks add up to {total}"
    return None


def check_tree(tree: object, where: str = "tree") -> dict:
    """``tree`` when :func:`tree_problem` finds nothing; an IntegrityError (exit 5) naming
    ``where`` and the entry otherwise."""
    why = tree_problem(tree)
    if why:
        raise IntegrityError(f"{where} {why}: refusing it",
                             hint="the registry or cache holds a corrupt or hostile snapshot; "
                                  "do not use it, and find out who pushed it")
    assert isinstance(tree, dict)
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
    """Write a checked tree out as ``dest`` (which must not exist, or be an empty
    folder), verifying every chunk. It is written in a temporary folder beside ``dest``
    and renamed into place complete, so a failure leaves nothing half-written. No
    component is written through a symlink (:class:`.securefs.Beneath`), and setuid,
    setgid and sticky bits are dropped (:func:`.securefs.safe_mode`)."""
    check_tree(tree)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        _write_tree(blobs, tree, tmp)
        os.rename(tmp, dest)  # replaces an empty folder; refuses a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tree(blobs: BlobStore, tree: dict, root: Path) -> None:
    dirs: dict[str, int] = {}  # every folder written, with its final mode
    open_fds: set[int] = set()
    lock = threading.Lock()

    def write(e: dict, fd: int) -> None:
        try:
            write_fd(blobs, e, fd, safe_mode(e.get("mode", 0o644)))
        finally:
            with lock:
                open_fds.discard(fd)
            os.close(fd)

    with Beneath(root) as disk:
        try:
            with ParallelWrites() as writes:  # files on a few threads: creating files is mostly waiting
                for e in tree["entries"]:
                    rel = e["path"]
                    for p in parents(rel):
                        dirs.setdefault(p, 0o755)
                    if e["type"] == "dir":
                        disk.dir(rel, create=True)
                        dirs[rel] = e.get("mode", 0o755)
                    elif e["type"] == "file":
                        fd = disk.create_file(rel)
                        with lock:
                            open_fds.add(fd)
                        writes.submit(rel, lambda e=e, fd=fd: write(e, fd), e["size"])
                    else:
                        disk.symlink(e["target"], rel)
        finally:
            for fd in open_fds:  # jobs that never ran (an earlier one failed)
                os.close(fd)
        # Folder modes last, deepest first, so a read-only folder does not block its own contents.
        for rel in sorted(dirs, reverse=True):
            disk.chmod_dir(rel, dirs[rel])
        os.chmod(root, 0o755)
