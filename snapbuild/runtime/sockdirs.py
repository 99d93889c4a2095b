"""The folders of the unix sockets a host server's tree has bound to a path.

A ZMQ ``ipc://`` endpoint, vLLM's engine sockets and a gunicorn ``unix:`` bind are
unix sockets at a path. CRIU binds them again at that path on restore, but only into
a folder that exists: on a clean node ``/tmp/<random>/`` does not. The checkpoint
records each socket's folder (:func:`bound_dirs`) and the runner makes the missing
ones before the restore (:func:`recreate`), each component created without following
a link. Only scratch folders (``/tmp``, ``/var/tmp``, ``/run``, ``/dev/shm``) and the
server's run folder qualify: a snapshot from a registry makes folders nowhere else
(schema.Runtime checks), and a build whose server binds elsewhere is told so.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SnapbuildError
from ..store.securefs import Beneath, UnsafeDisk
from .process import fds

SCRATCH = ("/tmp", "/var/tmp", "/run", "/dev/shm")


def bound_dirs(pids: list[int]) -> list[str]:
    """The folders of the path-bound unix sockets that ``pids`` hold, sorted."""
    inodes = {int(link[8:-1]) for pid in pids for _, link in fds(pid) if link.startswith("socket:[")}
    paths: set[str] = set()
    for pid in pids[:1]:  # one network namespace: the tree's
        try:
            lines = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split(None, 7)
            if len(f) == 8 and f[7].startswith("/") and int(f[6]) in inodes:
                paths.add(os.path.dirname(f[7]))
    return sorted(paths)


def place(folder: str, run_dir: str) -> tuple[str, str] | None:
    """(root, path below it) of a folder a restore may create, or None when it may not."""
    norm = os.path.normpath(folder)
    if norm != folder or not folder.startswith("/") or "\0" in folder:
        return None
    for root in (run_dir, *SCRATCH):
        if norm == root:
            return root, ""
        if norm.startswith(root + "/"):
            return root, norm[len(root) + 1:]
    return None


def recreate(folders: list[str], run_dir: str) -> None:
    """Make each of ``folders`` that is missing (0755), below its scratch root, never
    through a link."""
    for folder in folders:
        where = place(folder, run_dir)
        if where is None:
            raise SnapbuildError(f"the snapshot's socket folder {folder} is not a scratch folder")
        root, rel = where
        if not rel:
            continue
        try:
            with Beneath(root) as b:
                existed = os.path.isdir(folder) and not os.path.islink(folder)
                fd = b.dir(rel, create=True)
                if not existed:
                    os.fchmod(fd, 0o755)
        except (OSError, UnsafeDisk) as e:
            raise SnapbuildError(f"cannot make the server's socket folder {folder}: "
                                 f"{e.message if isinstance(e, SnapbuildError) else e}") from None
