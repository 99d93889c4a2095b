"""Read-only bind mounts of input trees for host processes (warm-up ``mounts:``).

A host process shares the machine's mount namespace, so its mounts are the node's:
``/models/minilm`` is bind-mounted read-only from the tree's content-addressed folder
before the server starts (build) or is restored (runner), and CRIU finds the weights
it mapped at the same path, with the same bytes, on every node.

One path holds one tree at a time. A path that already shows the tree wanted is
reused as it is (a second restore of the same snapshot, a build beside a running
server); another input tree left there is replaced when no process uses it any more;
anything else is refused, never hidden.

The runner records which of its servers use each mount point (:func:`claim`, in
``<run root>/mounts/``); once none of them runs any more, :func:`release` (called by
``snapbuild-runner stop``, the agent's stop, which is the same, and ``gc``) unmounts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from .. import tools
from ..errors import NodeError
from ..schema import mount_point_problem
from ..store import default_home
from ..store.fsutil import flock
from .erofs import is_image_mount
from .identity import ProcessIdentity
from .layout import TREE_MARKER, secure_dir
from .mountinfo import is_mount_point, mount_points, source_deleted


class MountError(NodeError):
    """A mount point that is taken or unusable: nothing starts (exit 11)."""


def same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def bind_ro(source: Path, dest: Path) -> bool:
    """Show ``source`` read-only at ``dest``. True if mounted now, False if ``dest``
    already showed ``source`` (then whoever mounted it unmounts it)."""
    # the path as written, and where its links lead (mount(8) follows them)
    store = (str(default_home()),)
    why = mount_point_problem(str(dest), store) or mount_point_problem(os.path.realpath(dest), store)
    if why:
        raise MountError(why)
    if is_mount_point(dest):
        if same_file(dest, source):
            return False
        # An input tree that an earlier build or restore left mounted there, or a mount whose
        # folder was deleted since, goes if nothing uses it any more: a plain umount fails
        # (EBUSY) while a process maps or opens a file.
        if not ((shows_input_tree(dest) or source_deleted(dest)) and _umount(dest)):
            raise MountError(f"{dest} is already a mount point, of other content than this snapshot's input",
                             hint="a server that another snapshot started may be using it: stop that server "
                                  f"(then this replaces the mount), or `umount {dest}`, or mount this input at "
                                  "another path")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise MountError(f"cannot mount an input at {dest}: a file or link is there",
                         hint="mount the input at a path that is free, or an empty folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise MountError(f"cannot mount an input at {dest}: the folder is not empty and the mount would hide "
                         "its files", hint="mount the input at a path that is free, or an empty folder")
    if os.geteuid() != 0:
        raise MountError(f"mounting an input at {dest} needs root (a bind mount in this machine's mount "
                         "namespace)", hint="run as root, or read the input from $SNAPBUILD_INPUTS/<step> "
                                            "instead of `mounts:`")
    dest.mkdir(parents=True, exist_ok=True)
    _mount(["--bind", str(source), str(dest)], dest)
    try:  # a bind mount takes its own flags only on a remount
        _mount(["-o", "remount,bind,ro", str(dest)], dest)
    except MountError:
        unmount(dest)
        raise
    return True


def shows_input_tree(dest: Path) -> bool:
    """Whether the mount at ``dest`` shows an input tree, written out or from its image."""
    return (dest / TREE_MARKER).is_file() or is_image_mount(dest)


def claim(root: Path, dests: list[Path], pid: int) -> str | None:
    """Record the running process ``pid`` as a user of the mount points ``dests`` (a host
    server's ``mounts:``, under run root ``root``). Returns a token that :func:`release`
    takes to drop this claim alone (None: no process, nothing recorded)."""
    ident = ProcessIdentity.of(pid)
    if ident is None or not dests:
        return None
    token = secrets.token_hex(8)
    folder = _records(root)
    secure_dir(folder)
    with flock(folder / ".lock"):
        for dest in dests:
            users = _users(_record(root, dest))
            _write(root, dest, [*users, {**ident.to_json(), "token": token}])
    return token


def release(root: Path, token: str | None = None) -> list[Path]:
    """Forget the users of mount points that no longer run, and the claim ``token``;
    unmount each point left without users when it still shows an input tree (a mount
    the runner made; whatever else is there now is not its to take away) and nothing
    holds it open (else the next call tries again). Returns the points unmounted."""
    folder = _records(root)
    if not folder.is_dir():
        return []
    gone = []
    with flock(folder / ".lock"):
        for record in sorted(folder.glob("*.json")):
            try:
                doc = json.loads(record.read_text())
                dest = Path(doc["dest"])
            except (OSError, ValueError, KeyError, TypeError):
                record.unlink(missing_ok=True)  # half-written: only the lock holder writes, so nobody's
                continue
            users = [u for u in _users(record) if u.get("token") != token and _running(u)]
            if users:
                _write(root, dest, users)
            elif not (is_mount_point(dest) and shows_input_tree(dest)):
                record.unlink()
            elif _umount(dest):
                gone.append(dest)
                record.unlink()
            else:
                _write(root, dest, [])  # held open by a process of no server of ours: next time
    return gone


def _records(root: Path) -> Path:
    return root / "mounts"


def _record(root: Path, dest: Path) -> Path:
    return _records(root) / (hashlib.sha256(str(dest).encode()).hexdigest()[:32] + ".json")


def _users(record: Path) -> list[dict]:
    try:
        users = json.loads(record.read_text())["users"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [u for u in users if isinstance(u, dict)] if isinstance(users, list) else []


def _running(user: dict) -> bool:
    ident = ProcessIdentity.from_json(user)
    return ident is not None and ident.alive()


def _write(root: Path, dest: Path, users: list[dict]) -> None:
    path = _record(root, dest)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"dest": str(dest), "users": users}))
    tmp.replace(path)


def unmount(dest: Path) -> None:
    """Take a mount away; one still in use goes lazily (when its last user closes it)."""
    if not _umount(dest):
        tools.run(["umount", "-l", str(dest)], what=f"lazy unmount of {dest}", error=MountError)


def _umount(dest: Path) -> bool:
    return tools.run(["umount", str(dest)], what=f"unmount of {dest}", error=MountError).returncode == 0


def mount_points_of(source: Path) -> list[Path]:
    """Every mount point of this namespace that shows the folder ``source``."""
    return [p for p in dict.fromkeys(mount_points()) if p != source and same_file(p, source)]


def _mount(args: list[str], dest: Path) -> None:
    r = tools.run(["mount", *args], what=f"mount at {dest}", error=MountError)
    if r.returncode != 0:
        raise MountError(f"cannot mount an input at {dest}: {r.stderr.strip() or 'mount failed'}")
