"""Files in a server's run folder that its processes hold, carried in its checkpoint.

A server writes into its run folder (``$SNAPBUILD_RUN``) at start-up and keeps what it
wrote: vLLM's torch.compile puts its kernels (``.so`` files) in
``VLLM_CACHE_ROOT=$SNAPBUILD_RUN/vllm-cache`` and its workers keep them mapped. CRIU
saves neither the files nor their content: it opens each at its path on restore
("Can't open file ... on restore: No such file or directory"), and a node that never
ran the warm-up has no such file.

So a host-process checkpoint carries them, as it does the tree's ``/dev/shm`` files
(runtime.shmfiles): before the dump, :func:`held` notes the paths below the run folder
of the regular files the tree maps (``/proc/PID/maps``) or holds open
(``/proc/PID/fd``), the runner's own files left out (the server's log, which the
runner opens and CRIU reopens by path; the links to its inputs); after it,
:func:`collect` copies them (their data only: holes stay holes) into the artifact;
before a restore, :func:`put_back` writes them below the node's run folder, each path
component opened without following a link (store.securefs.Beneath): a snapshot from
a registry writes nowhere else (schema.Runtime checks the paths too).

A file the tree holds after deleting it is not carried here: CRIU keeps its content in
its images (a ghost file) and makes it again on restore.

A runc container's run folder is its instance's own (one per container, made empty
for each start or restore, mounted at ``/snapbuild/run``): the tree's paths are the
container's (what ``/proc/PID/maps`` shows of a process in another mount namespace),
copied from the instance's folder, and put back into the new instance's folder before
``runc restore``. (gVisor keeps a sandbox's files in its own checkpoint.)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import SnapbuildError
from ..store.securefs import Beneath, parents, unsafe_relpath
from .layout import runner_owned
from .process import fds, mapped
from .shmfiles import copy_file, copy_sparse, remove

DELETED = " (deleted)"


def held(pids: list[int], run_dir: str | Path) -> set[str]:
    """The paths, relative to ``run_dir``, of the files below it that one of ``pids``
    maps or has open, the runner's own left out (the kernel's paths are resolved: a
    link into an input tree is not below it; a deleted file is CRIU's to carry)."""
    prefix = str(run_dir).rstrip("/") + "/"
    out: set[str] = set()

    def note(path: str) -> None:
        rel = path[len(prefix):]
        if not path.endswith(DELETED) and not unsafe_relpath(rel) and not runner_owned(rel):
            out.add(rel)

    for pid in pids:
        for path, _, _ in mapped(pid, prefix):
            note(path)
        for _, target in fds(pid):
            if target.startswith(prefix):
                note(target)
    return out


def collect(paths: set[str], run_dir: Path, dest: Path) -> list[dict]:
    """Copy the regular files at ``paths`` below ``run_dir`` into ``dest``, at the same
    relative paths, their data only; returns their records (path, mode, size), sorted
    by path. What is no longer a regular file there is left out (CRIU's dump then
    failed, or its restore says which file is missing)."""
    out = []
    for rel in sorted(paths):
        src = run_dir / rel
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_file(src, dest / rel, 0o600)
        out.append({"path": rel, "mode": stat.S_IMODE(st.st_mode) & 0o777, "size": st.st_size})
    return out


def put_back(files: list[dict], src: Path, run_dir: Path) -> list[Path]:
    """Write each of ``files`` (records from :func:`collect`, content in ``src``) below
    ``run_dir``, replacing what is at its path (a process that holds the old file keeps
    it); a link or a folder on the way is refused. Returns the paths written."""
    written: list[Path] = []
    if not files:
        return written
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with Beneath(run_dir) as below:
            for rec in files:
                rel = rec["path"]
                new = [p for p in parents(rel) if not os.path.lexists(run_dir / p)]
                fd = below.create_file(rel)
                written.append(run_dir / rel)
                try:
                    inp = os.open(src / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        copy_sparse(inp, fd)
                    finally:
                        os.close(inp)
                    os.fchmod(fd, rec["mode"] & 0o777)
                finally:
                    os.close(fd)
                for folder in new:  # Beneath makes folders 0700; the server may run as another user
                    below.chmod_dir(folder, 0o755)
    except (OSError, SnapbuildError) as e:
        remove(written)
        msg = e.message if isinstance(e, SnapbuildError) else str(e)
        raise SnapbuildError(f"cannot put the server's files back in its run folder {run_dir}: {msg}") from None
    except BaseException:
        remove(written)
        raise
    return written
