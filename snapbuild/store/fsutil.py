"""Small filesystem primitives: atomic writes, directory fsync, advisory locks.

Everything that becomes visible in a store or registry goes through
:func:`atomic_write` or :func:`publish_file`: data is written to a unique temporary
file in the same filesystem, fsynced, then renamed into place, so a reader (or a
process killed half way) never sees a partial file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import, before any thread could race on it


def canonical_json(obj) -> bytes:
    """The one JSON encoding used for digests: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def temp_file(dirpath: Path, prefix: str = "tmp-") -> Iterator[tuple[int, Path]]:
    """A unique temporary file in ``dirpath``; removed on exit unless renamed away."""
    dirpath.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dirpath, prefix=prefix)
    # mkstemp makes files 0600; published data should be as readable as any new file.
    os.fchmod(fd, 0o666 & ~_UMASK)
    path = Path(name)
    try:
        yield fd, path
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def publish_file(tmp: Path, final: Path, *, replace: bool = True) -> bool:
    """Rename a complete, fsynced temp file into place and fsync the directory.

    With ``replace=False`` an existing ``final`` is kept (content-addressed data is
    immutable) and ``False`` is returned.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        os.rename(tmp, final)
    else:
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
    fsync_dir(final.parent)
    return True


def atomic_write(path: Path, data: bytes, *, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    tmp_dir = tmp_dir or path.parent
    with temp_file(tmp_dir, prefix=f".{path.name}.") as (fd, tmp):
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_file(tmp, path)


def atomic_write_json(path: Path, obj, *, tmp_dir: Path | None = None) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n", tmp_dir=tmp_dir)


def read_json(path: Path):
    with open(path, "rb") as f:
        return json.load(f)


@contextlib.contextmanager
def flock(path: Path, *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """An advisory ``flock(2)`` on ``path`` (created if needed), released on exit.

    Yields whether the lock was taken (always ``True`` when ``blocking``). The kernel
    drops the lock when the process dies, so a killed build never leaves a stale lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not blocking:
            op |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
