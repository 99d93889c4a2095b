"""Input trees (code, dependencies, weights) materialized once per machine at
content-addressed paths: ``$RUN_ROOT/trees/<hex>/``.

The warm process sees its inputs there on the build machine, and the runner puts the
same bytes at the same path on every node. That is what lets CRIU leave unmodified
file-backed pages (mapped weights, shared libraries) out of the checkpoint, and what
lets many snapshots share one copy of their weights per node.

Servers share these trees, so none may write into one (it would change every other's
inputs, and the bytes a restore expects to find): a host server's trees are shown
read-only (:func:`show_read_only`, a read-only bind mount of each tree's folder over
itself, made before its warm-up, restore or cold boot); a container gets them as
read-only bind mounts (runtime.container); a tree mounted from its image is read-only.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import tools
from ..errors import SnapbuildError
from ..store import fsutil
from ..store.blobs import BlobStore
from ..store.fsutil import flock
from ..store.tree import load_tree, materialize
from . import erofs, layout
from .mountinfo import is_mount_point

log = logging.getLogger(__name__)

MARKER = layout.TREE_MARKER  # inside a complete tree: the stores (one path a line) that use it


def ensure_tree(blobs: BlobStore, digest: str, root: Path, image: str | None = None) -> tuple[Path, bool]:
    """The tree's folder, materialized (verified) if not there yet, with the store of
    ``blobs`` recorded as one of its users (see :func:`release`). Returns (path, created).

    With ``image`` (the digest of the tree's EROFS image, see :mod:`.erofs`), a
    tree not there yet is mounted from its image instead of written out file by file;
    its users are then kept beside it (``<hex>.users``), since the mount is read-only.
    Raises :class:`.erofs.ImageUnusable` when the image cannot be mounted."""
    layout.secure_root(root)
    final = layout.tree_dir(root, digest)
    user = str(blobs.root) + "\n"
    text = _users_text(final)
    if text is not None and user in text.splitlines(keepends=True):
        return final, False
    with flock(layout.tree_lock(root, layout.hex_of(digest))):
        text = _users_text(final)
        if text is not None:
            if user not in text.splitlines(keepends=True):
                with _writable(final), open(_marker(final), "a") as f:
                    f.write(user)
            return final, False
        tmp = layout.tree_partial(final)
        fsutil.remove_tree(tmp, ignore_errors=True)
        # (an image tree whose mount went with a reboot keeps its users)
        users = [u for u in (_read(layout.tree_users(final)) or "").splitlines(keepends=True) if u != user]
        discard(final)  # an incomplete earlier attempt
        if image is not None:
            erofs.mount_tree(blobs, image, final)
            fsutil.atomic_write(layout.tree_users(final), "".join(users + [user]).encode())  # last: the tree is complete
            return final, True
        materialize(blobs, load_tree(blobs, digest), tmp)
        (tmp / MARKER).write_text(user)
        os.rename(tmp, final)  # only complete trees appear under their name
    return final, True


def ensure_inputs(blobs: BlobStore, inputs: dict[str, str], root: Path, images: dict[str, str] | None = None,
                  also=None) -> dict[str, Path]:
    """A server's input trees (``inputs``: name -> digest), each as :func:`ensure_tree`
    gives it (mounted from its image where ``images``, tree digest -> image tree digest,
    has one), written out side by side on a few threads: writing
    verified chunks is hashing, decompressing and waiting on the disk, which all
    release the GIL. ``also()``, when given, runs beside them (a container's layers)."""
    from concurrent.futures import ThreadPoolExecutor

    images = images or {}
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="trees") as pool:
        extra = pool.submit(also) if also is not None else None
        jobs = {name: pool.submit(ensure_tree, blobs, d, root, images.get(d)) for name, d in inputs.items()}
        paths = {name: job.result()[0] for name, job in jobs.items()}
        if extra is not None:
            extra.result()
    return paths


def release(path: Path, store_root: Path, *, dry_run: bool = False, before=None) -> bool | None:
    """Drop ``store_root`` from the tree's users; remove the tree when no store that
    still exists uses it (calling ``before(path)`` first). True when removed, False
    when kept for other users, None when the tree is not this store's to release."""
    root = path.parent.parent
    with flock(layout.tree_lock(root, path.name)):
        text = _users_text(path)
        users = text.splitlines() if text else []
        if str(store_root) not in users:
            return None
        others = [u for u in users if u != str(store_root) and os.path.isdir(u)]
        if dry_run:
            return not others
        if others:
            with _writable(path):
                fsutil.atomic_write(_marker(path), "".join(u + "\n" for u in others).encode())
            return False
        if before is not None:
            before(path)
        discard(path)
        return True


def _marker(path: Path) -> Path:
    """The file that lists a tree's users: beside a tree mounted from its image, else inside."""
    side = layout.tree_users(path)
    return side if side.exists() else path / MARKER


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _users_text(path: Path) -> str | None:
    """The marker's content: None while the tree is absent or incomplete (or an image
    tree no longer mounted, after a reboot)."""
    text = _read(layout.tree_users(path))
    if text is not None:
        return text if os.path.ismount(path) else None
    try:
        with open(path / MARKER) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def link_inputs(inputs: dict[str, Path], dest: Path) -> None:
    """``dest/<step>`` -> the tree folder: the names a host server uses for its inputs,
    each tree shown read-only first (:func:`show_read_only`). Each link is made beside
    its place and renamed over it, so two restores of one snapshot that share a run
    folder (an agent's replicas) never see it missing nor trip over each other's."""
    import threading

    dest.mkdir(parents=True, exist_ok=True)
    for name, path in inputs.items():
        show_read_only(path)
        tmp = dest / f".{name}.{os.getpid()}-{threading.get_ident()}.link"
        tmp.unlink(missing_ok=True)
        os.symlink(path, tmp)
        os.replace(tmp, dest / name)


def link_farm(src: Path, dest: Path) -> dict[str, tuple[int, int, int]]:
    """Recreate the tree at ``src`` under ``dest`` with real folders and hard-linked
    files (a copy where linking is impossible), so that a command sees ordinary files
    (``cp -r`` copies them) without gigabytes being copied for every step.

    Returns each linked file's (size, mtime_ns, mode), so :func:`modified` can tell
    whether the command wrote to a shared file in place.
    """
    sigs: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in fsutil.walk(src):
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
    """Forget a materialized tree (it will be written out again when next needed); a
    tree mounted from its image is unmounted and its image file deleted too, and a
    written-out one shown read-only loses that mount first."""
    side = layout.tree_users(path)
    if side.exists() or os.path.ismount(path):
        erofs.take_down(path)
        side.unlink(missing_ok=True)
    elif is_mount_point(path):
        _unmount(path)
    marker = path / MARKER
    marker.unlink(missing_ok=True)
    fsutil.remove_tree(path, ignore_errors=True)


# --- read-only trees --------------------------------------------------------------------

def show_read_only(tree: Path) -> None:
    """Show a complete, written-out tree read-only from now on: a bind mount of its
    folder over itself, remounted read-only, so that a server that writes into its
    inputs gets EROFS instead of changing them for every other server (root can write
    through file modes; not through a read-only mount). The mount stays until the tree
    is discarded (or the machine restarts; the next server to use it mounts it again).

    CRIU finds a restored server's files at the same paths, on the same bytes; where
    the files live on a mount of their own makes no difference to a host process (the
    same as `mounts:`). Nothing happens to a tree that is a mount point already (mounted
    from its image: read-only), nor without root (no mount possible: the tree stays
    writable, as it always was; a debug log says so). A mount that fails is a warning,
    never a failed start."""
    if os.geteuid() != 0:
        log.debug("not root: input tree %s stays writable to the servers that use it", tree)
        return
    if is_mount_point(tree) or not (tree / MARKER).is_file():
        return  # mounted (from its image, or shown read-only already), or not a complete written-out tree
    with fsutil.flock(layout.tree_lock(tree.parent.parent, tree.name)):
        if is_mount_point(tree) or not (tree / MARKER).is_file():
            return  # another process mounted it meanwhile, or discarded it
        try:
            _mount(["--bind", str(tree), str(tree)], tree)
            try:  # a bind mount takes its own flags only on a remount
                _mount(["-o", "remount,bind,ro", str(tree)], tree)
            except SnapbuildError:
                _unmount(tree)
                raise
        except SnapbuildError as e:
            log.warning("input tree %s stays writable to the servers that use it: %s", tree, e.message)


def _bound(tree: Path) -> bool:
    """Whether ``tree`` is a written-out tree shown read-only by :func:`show_read_only`
    (a tree mounted from its image keeps its users beside it)."""
    return not layout.tree_users(tree).exists() and is_mount_point(tree)


@contextmanager
def _writable(tree: Path) -> Iterator[None]:
    """Inside this block the tree's marker can be written: a tree shown read-only is
    remounted read-write for that moment (the caller holds the tree's lock)."""
    bound = _bound(tree)
    if bound:
        _mount(["-o", "remount,bind,rw", str(tree)], tree)
    try:
        yield
    finally:
        if bound:
            _mount(["-o", "remount,bind,ro", str(tree)], tree)


def _mount(args: list[str], tree: Path) -> None:
    r = tools.run(["mount", *args], what=f"read-only mount of input tree {tree}")
    if r.returncode != 0:
        raise SnapbuildError(f"cannot mount input tree {tree} ({' '.join(args[:2])}): "
                             f"{r.stderr.strip() or 'mount failed'}")


def _unmount(tree: Path) -> None:
    """Take the tree's read-only mount away; one still in use goes lazily."""
    if tools.run(["umount", str(tree)], what=f"unmount of {tree}").returncode != 0:
        tools.run(["umount", "-l", str(tree)], what=f"lazy unmount of {tree}")
