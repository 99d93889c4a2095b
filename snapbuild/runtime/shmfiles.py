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

import os
import shutil
import stat
from pathlib import Path

from ..errors import SnapbuildError
from .process import all_pids, fds

SHM = Path("/dev/shm")


def held_inodes(pids: list[int], shm: Path = SHM) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of each file under ``shm`` that one of ``pids`` maps or has open,
    deleted or not."""
    prefix = str(shm).rstrip("/") + "/"
    out: set[tuple[int, int]] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(prefix):
                major, _, minor = parts[3].partition(":")
                out.add((os.makedev(int(major, 16), int(minor, 16)), int(parts[4])))
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
        shutil.copyfile(shm / name, dest / name, follow_symlinks=False)
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
            with os.fdopen(fd, "wb") as out, open(src / rec["name"], "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
            os.chmod(path, rec["mode"] & 0o777)  # whatever the umask took away
    except OSError as e:
        remove(written)
        raise SnapbuildError(f"cannot put the server's shared-memory files back in {shm}: {e}") from None
    except BaseException:
        remove(written)
        raise
    return written


def remove(paths: list[Path]) -> None:
    """Take back what :func:`put_back` wrote (a restore that failed)."""
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
