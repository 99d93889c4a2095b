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
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from collections.abc import Iterable, Iterator

from ..errors import IntegrityError, NodeError, UsageError
from .blobs import BlobStore
from .chunks import CHUNK_SIZE, PACK_BELOW, Packer, chunk_digests, put_stream, write_fd
from .fsutil import ParallelWrites, canonical_json, free_space, remove_tree
from .fsutil import walk as _walk_dirs
from .securefs import Beneath, check_relpath, safe_mode, unsafe_relpath

MEDIA_TYPE = "application/vnd.snapbuild.tree.v1+json"


@dataclass(frozen=True)
class TreeLimits:
    """The most a tree from elsewhere may hold; a tree past any of them is refused as
    hostile (IntegrityError, exit 5) before anything of it is written.

    - ``depth``: folder levels of any path (``a/b/c`` is 3). Real trees (a Python
      environment, a model, CRIU images) stay under 30; the kernel's PATH_MAX allows
      2,000, and a walk per level is what made such trees take minutes.
    - ``entries``: files, links and folders, the folders a path implies included (each
      is an inode on the node, and memory while the tree is checked).
    - ``bytes``: the file sizes a tree declares, summed: what writing it out costs. A
      few bytes of zstd decompress to a 4 MiB chunk, and one chunk may be named any
      number of times, so a tree of kilobytes can declare terabytes.

    A node sets its own with ``SNAPBUILD_TREE_LIMITS`` (:func:`tree_limits`). Writing a
    tree out also checks that its file system has the room (:func:`materialize`).
    """

    depth: int = 256
    entries: int = 1_000_000
    bytes: int = 1 << 40  # 1 TiB


DEFAULT_LIMITS = TreeLimits()
LIMITS_ENV = "SNAPBUILD_TREE_LIMITS"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def tree_limits() -> TreeLimits:
    """The node's :class:`TreeLimits`: the defaults, each overridden where
    ``$SNAPBUILD_TREE_LIMITS`` names it (``depth=64,entries=200000,bytes=500G``; sizes
    in bytes or with K, M, G or T). A value that does not parse is a usage error."""
    from .. import settings

    text = str(settings.get("tree_limits") or "").strip()
    values: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", value.strip(), re.IGNORECASE)
        if key.strip() not in TreeLimits.__dataclass_fields__ or not m or int(m.group(1)) < 1:
            raise UsageError(f"{LIMITS_ENV}={text!r}: {item!r} is not KEY=NUMBER with KEY depth, entries or bytes",
                             hint=f"e.g. {LIMITS_ENV}=depth=256,entries=1000000,bytes=1T")
        values[key.strip()] = int(m.group(1)) * _UNITS[m.group(2).upper()]
    return TreeLimits(**values) if values else DEFAULT_LIMITS


def _check_relpath(rel: str) -> str:
    return check_relpath(rel)


def walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Every path below ``root`` (directories, files, symlinks) as (relpath, abspath)."""
    for dirpath, dirnames, filenames in _walk_dirs(root):
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


def tree_problem(tree: object, limits: TreeLimits | None = None) -> str | None:
    """What is wrong with a tree that came from elsewhere (None: nothing). Entries
    must be unique and sorted, of a known type, never below a file or a symlink; modes,
    sizes, chunk sizes and pack slices must add up; the tree must stay within
    ``limits`` (default: the node's, :func:`tree_limits`). Linear in the tree's size,
    whatever its shape: each folder a path implies is looked at once."""
    limits = limits or tree_limits()
    if not isinstance(tree, dict) or tree.get("mediaType") != MEDIA_TYPE:
        return "is not a snapbuild tree"
    entries = tree.get("entries")
    if not isinstance(entries, list):
        return "has no list of entries"
    if len(entries) > limits.entries:
        return _past(f"has {len(entries)} entries", "entries", limits.entries)
    last = None
    folders: set[str] = set()  # listed or implied by a path
    leaves: set[str] = set()  # files and symlinks: nothing may be below them
    total = 0
    for e in entries:
        if not isinstance(e, dict):
            return "has an entry that is not an object"
        path = e.get("path")
        why = unsafe_relpath(path)
        if why:
            return f"entry {path!r} {why}"
        assert isinstance(path, str)
        depth = path.count("/") + 1
        if depth > limits.depth:
            return _past(f"entry {_short(path)} is {depth} folders deep", "depth", limits.depth)
        if last is not None and path <= last:
            return f"entry {path!r} is {'a duplicate' if path == last else 'out of order'}"
        last = path
        above = _new_folders(path, folders, leaves)
        if isinstance(above, str):
            return f"entry {path!r} is below {above!r}, which is not a folder"
        if len(folders) + len(leaves) + 1 > limits.entries:  # this entry, and every folder above it
            return _past(f"has more than {limits.entries} entries (the folders its paths imply included)",
                         "entries", limits.entries)
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
            folders.add(path)
            continue
        leaves.add(path)
        why = _file_problem(e)
        if why:
            return f"file {path!r} {why}"
        total += e["size"]
        if total > limits.bytes:
            return _past(f"declares more than {_human(limits.bytes)} of files (at {path!r})", "bytes", limits.bytes)
    return None


def _past(what: str, key: str, limit: int) -> str:
    return f"{what}, past this node's limit ({key}={limit}; {LIMITS_ENV} sets it)"


def _short(path: str) -> str:
    return repr(path) if len(path) <= 80 else repr(path[:60]) + f"... ({len(path)} characters)"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _new_folders(path: str, folders: set[str], leaves: set[str] = frozenset()) -> list[str] | str:
    """The folders above ``path`` not in ``folders`` yet (innermost first), added to it;
    or the first one that is in ``leaves`` (a file or link, refused). Walking up stops
    at a folder seen before, whose own parents were seen then: every folder is walked
    once over a whole tree."""
    new = []
    head = path.rpartition("/")[0]
    while head and head not in folders:
        if head in leaves:
            return head
        new.append(head)
        head = head.rpartition("/")[0]
    folders.update(new)
    return new


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


def disk_need(tree: dict) -> tuple[int, int]:
    """What writing a checked tree out takes: bytes (its chunks but holes, each file
    rounded up to a 4 KiB block) and inodes (its entries and the folders they imply)."""
    need, folders, others = 0, set(), 0
    for e in tree["entries"]:
        _new_folders(e["path"], folders)
        if e["type"] == "dir":
            folders.add(e["path"])
            continue
        others += 1
        if e["type"] == "file":
            data = sum(ref["size"] for ref in e["chunks"] if ref["enc"] != "zero")
            need += -(-data // 4096) * 4096
    return need + 4096 * len(folders), len(folders) + others


def check_room(tree: dict, dest: Path, where: str = "tree") -> None:
    """A NodeError (exit 11) when the file system of ``dest`` has not the bytes or the
    inodes to write ``tree`` out (:func:`disk_need`)."""
    need, inodes = disk_need(tree)
    free, free_inodes = free_space(dest)
    if need > free or (free_inodes is not None and inodes > free_inodes):
        lack = (f"{_human(need)} but {_human(free)} is free" if need > free
                else f"{inodes} inodes but {free_inodes} are free")
        raise NodeError(f"writing {where} to {dest} needs {lack} on that file system: not written",
                        hint="free space there (`snapbuild-runner gc` removes what no snapshot uses), "
                             "or write it to a bigger file system")


def materialize(blobs: BlobStore, tree: dict, dest: Path, where: str = "tree") -> None:
    """Write a checked tree out as ``dest`` (which must not exist, or be an empty
    folder), verifying every chunk. It is written in a temporary folder beside ``dest``
    and renamed into place complete, so a failure leaves nothing half-written; before
    that, the tree must fit in the file system's free space (:func:`check_room`). No
    component is written through a symlink (:class:`.securefs.Beneath`), and setuid,
    setgid and sticky bits are dropped (:func:`.securefs.safe_mode`). ``where`` names
    the tree in errors."""
    check_tree(tree, where)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    check_room(tree, dest.parent, where)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        _write_tree(blobs, tree, tmp)
        os.rename(tmp, dest)  # replaces an empty folder; refuses a non-empty one
    except BaseException:
        remove_tree(tmp, ignore_errors=True)
        raise


def _write_tree(blobs: BlobStore, tree: dict, root: Path) -> None:
    dirs: dict[str, int] = {}  # every folder written, with its final mode
    implied: set[str] = set()  # the folders above entries seen so far
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
                    for p in _new_folders(rel, implied):
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
