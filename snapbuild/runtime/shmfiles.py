"""Files in ``/dev/shm`` that a host server's processes hold, carried in its checkpoint.

Process trees share memory through ``/dev/shm``: multiprocessing's POSIX semaphores
(``sem.*``, unlinked as soon as the children have them, or kept by name for spawned
children), ``multiprocessing.shared_memory`` blocks (``psm_*``), torch's shared
tensors, vLLM's ring buffers. CRIU saves neither their content nor the files: it
expects a named file at its name on restore, and with ``--link-remap`` a dump links
each deleted file it meets back in as ``/dev/shm/link_remap.N``, which the restore
opens (and removes once done). Another node has none of them.

So a host-process checkpoint carries them: before the dump, :func:`held_inodes` notes
the (device, inode) of every ``/dev/shm`` file the tree maps or holds open; after it,
:func:`collect` copies each file at the top of ``/dev/shm`` with one of those inodes
(named files and the dump's link-remap files alike) into the artifact and removes it
from the build machine unless a process outside the tree still holds it; before a restore,
:func:`put_back` writes them to ``/dev/shm`` again. Their names are plain names (a
snapshot from a registry writes nowhere else: schema.Runtime checks). A container has
a ``/dev/shm`` of its own, which its runtime checkpoints with it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import SnapbuildError
from .process import all_pids, fds, mapped

SHM = Path("/dev/shm")


def held_inodes(pids: list[int], shm: Path = SHM) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of each file under ``shm`` that one of ``pids`` maps or has open,
    deleted or not."""
    prefix = str(shm).rstrip("/") + "/"
    out: set[tuple[int, int]] = set()
    for pid in pids:
        out.update((dev, ino) for _, dev, ino in mapped(pid, prefix))
        for path, target in fds(pid):
            if target.startswith(prefix):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                out.add((st.st_dev, st.st_ino))
    return out


def collect(inodes: set[tuple[int, int]], dest: Path, shm: Path = SHM) -> list[dict]:
    """Copy each regular file at the top of ``shm`` whose inode is one of ``inodes`` into
    ``dest``, and remove it from ``shm`` unless a process still holds it (the dumped ones
    are gone; one outside the tree keeps its file); returns their records (name, mode,
    size), sorted by name."""
    if not inodes:
        return []
    found = []
    with os.scandir(shm) as it:
        for entry in it:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) in inodes:
                found.append((entry.name, st))
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, st in sorted(found):
        copy_file(shm / name, dest / name, 0o600)
        out.append({"name": name, "mode": stat.S_IMODE(st.st_mode), "size": st.st_size})
    still_held = held_inodes(all_pids(), shm)
    for name, st in found:
        if (st.st_dev, st.st_ino) not in still_held:
            (shm / name).unlink(missing_ok=True)
    return out


def put_back(files: list[dict], src: Path, shm: Path = SHM) -> list[Path]:
    """Write each of ``files`` (records from :func:`collect`, their content in ``src``)
    to ``shm``, replacing a stale file of the same name (the restore's PIDs are free,
    so no process of this snapshot holds it). Returns the paths written."""
    written: list[Path] = []
    try:
        for rec in files:
            path = shm / rec["name"]
            if path.is_symlink() or path.exists():
                if not path.is_file() or path.is_symlink():
                    raise SnapbuildError(f"cannot put back {path}: something other than a file is there")
                path.unlink()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, rec["mode"] & 0o777)
            written.append(path)
            try:
                with open(src / rec["name"], "rb") as inp:
                    copy_sparse(inp.fileno(), fd)
                os.fchmod(fd, rec["mode"] & 0o777)  # whatever the umask took away
            finally:
                os.close(fd)
    except OSError as e:
        remove(written)
        raise SnapbuildError(f"cannot put the server's shared-memory files back in {shm}: {e}") from None
    except BaseException:
        remove(written)
        raise
    return written


BLOCK = 1 << 20
PAGE = 4096
ZERO_BLOCK = bytes(BLOCK)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``fd``'s first ``size`` bytes that hold data, as the
    file system knows them (``SEEK_DATA``/``SEEK_HOLE``; tmpfs and ext4 keep holes at
    page or block granularity); one range for all of it where it cannot tell."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from here to the end
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP) and not out:
                return [(0, size)]  # a file system without holes: all of it is data
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def copy_sparse(src: int, dst: int) -> int:
    """Copy file ``src`` to the empty file ``dst`` (descriptors), reading its data ranges
    only (:func:`data_extents`) and writing their pages that are not all zeros: holes
    stay holes, and so do zero pages that the source stores (a tree written out from the
    store holds each 4 MiB chunk with data in full). ``dst`` ends up the size of ``src``.
    Returns the bytes written."""
    size = os.fstat(src).st_size
    written = 0
    for start, end in data_extents(src, size):
        pos = start
        while pos < end:
            data = os.pread(src, min(BLOCK, end - pos), pos)
            if not data:  # shorter than it said: the truncate below keeps the size
                break
            written += _write_data(dst, data, pos)
            pos += len(data)
    os.ftruncate(dst, size)
    return written


def _write_data(dst: int, data: bytes, pos: int) -> int:
    """Write the runs of pages of ``data`` (file offset ``pos``) that are not all zeros."""
    n = len(data)
    if data == ZERO_BLOCK[:n]:  # at memcmp speed: most blocks of a sparse file
        return 0
    zero = lambda i: data[i:i + PAGE] == ZERO_BLOCK[:min(PAGE, n - i)]  # noqa: E731
    written, i = 0, 0
    while i < n:
        while i < n and zero(i):
            i += PAGE
        j = i
        while j < n and not zero(j):
            j += PAGE
        j = min(j, n)
        part = memoryview(data)[i:j]
        while part:
            k = os.pwrite(dst, part, pos + j - len(part))
            part = part[k:]
        written += j - i
        i = j
    return written


def copy_file(src: Path, dest: Path, mode: int) -> None:
    """:func:`copy_sparse` from path ``src`` (a link there is not followed) to a new
    file ``dest`` of permission ``mode``."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        inp = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            copy_sparse(inp, fd)
        finally:
            os.close(inp)
    finally:
        os.close(fd)


def remove(paths: list[Path]) -> None:
    """Take back what :func:`put_back` wrote (a restore that failed)."""
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
