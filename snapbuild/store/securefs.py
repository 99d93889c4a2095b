"""Writing registry bytes to disk without trusting them: the one place that decides.

snapbuild runs as root, and a tree, a layer or a config comes from a registry that
anyone with push access controls. Everything written out from one goes through the
rules here:

- **Names.** A path in a tree is relative, normalized, and has no ``.`` or ``..``
  component (:func:`check_relpath`); a name used as one folder (an output, a step, a
  recipe name) is a plain name (:func:`check_name`).
- **Modes.** setuid, setgid and sticky bits are dropped from everything written
  (:func:`safe_mode`): a snapshot never makes a setuid-root file on a node.
- **No link is followed.** :class:`Beneath` resolves every component of a path from
  the folder being written with ``openat(O_NOFOLLOW | O_DIRECTORY)``, relative to its
  parent's descriptor, the way filepath-securejoin and ``openat2(RESOLVE_BENEATH)``
  do it for runc and containerd: a symlink, whether the tree made it or it was on
  disk already, is never written through, and a file is created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from pathlib import PurePosixPath

from ..errors import IntegrityError

#: The permission bits kept from a tree or a layer; setuid, setgid and sticky are not.
MODE_BITS = 0o777
NAME_MAX = 255
PATH_MAX = 4096


def safe_mode(mode: int) -> int:
    """The mode written for a stored ``mode``: its permission bits only."""
    return mode & MODE_BITS


def unsafe_relpath(rel: object) -> str | None:
    """Why ``rel`` is not a safe relative path (None when it is)."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if "\0" in rel:
        return "holds a NUL byte"
    if len(rel.encode("utf-8", "surrogateescape")) > PATH_MAX:
        return f"is longer than {PATH_MAX} bytes"
    if rel.startswith("/"):
        return "is absolute"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' component"
    if any(len(p.encode("utf-8", "surrogateescape")) > NAME_MAX for p in parts):
        return f"has a component longer than {NAME_MAX} bytes"
    return None


def check_relpath(rel: object, where: str = "tree entry") -> str:
    why = unsafe_relpath(rel)
    if why:
        raise IntegrityError(f"{where} {rel!r} {why}: not a safe relative path")
    assert isinstance(rel, str)
    return rel


def unsafe_name(name: object) -> str | None:
    """Why ``name`` cannot be used as one folder's name (None when it can)."""
    why = unsafe_relpath(name)
    if why:
        return why
    assert isinstance(name, str)
    if "/" in name:
        return "has a '/'"
    return None


def check_name(name: object, where: str) -> str:
    why = unsafe_name(name)
    if why:
        raise IntegrityError(f"{where} {name!r} {why}: it must be a plain name, used as a folder's name")
    assert isinstance(name, str)
    return name


class UnsafeDisk(IntegrityError):
    """What is on disk under the destination would make a write land elsewhere."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Beneath:
    """Create folders, files and symlinks below ``root`` without following a link.

    Folder descriptors are kept in a small LRU, so a tree of thousands of files opens
    each folder about once. Use from one thread; the file descriptors it returns may be
    written on others.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 64) -> None:
        self.root = os.fspath(root)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._keep = keep

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self._root_fd)

    def __enter__(self) -> Beneath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _refuse(self, rel: str, what: str) -> UnsafeDisk:
        return UnsafeDisk(f"{os.path.join(self.root, rel)} {what}; refusing to write through it",
                          hint="write into a new or empty folder")

    def dir(self, rel: str, create: bool = False) -> int:
        """The descriptor of folder ``rel`` (``""``: the root), each component opened
        without following links; with ``create``, missing folders are made (0700; the
        caller sets their final mode). Walks up to the nearest folder open already, then
        down one component at a time: no recursion, whatever the depth."""
        below: list[str] = []  # the folders to open, innermost first
        head = rel
        while head and head not in self._fds:
            below.append(head)
            head = head.rpartition("/")[0]
        if head:
            self._fds.move_to_end(head)
        fd = self._fds[head] if head else self._root_fd
        for path in reversed(below):
            fd = self._open_dir(fd, path, create)
        return fd

    def _open_dir(self, parent: int, rel: str, create: bool) -> int:
        name = rel.rpartition("/")[2]
        if create:
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._refuse(rel, "is a symlink or not a folder") from None
            raise
        self._fds[rel] = fd
        if len(self._fds) > self._keep:  # the least recently used; never ``fd``, just added
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _clear(self, parent: int, name: str, rel: str) -> None:
        """Make room for a new file or link at ``name``: an old file or link there is
        removed (unlinking a link never touches what it points at); a folder is refused."""
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise self._refuse(rel, "is a folder on disk")
        os.unlink(name, dir_fd=parent)

    def create_file(self, rel: str) -> int:
        """A new, empty file at ``rel`` opened for writing (mode 0600 until the caller
        sets it)."""
        head, _, name = rel.rpartition("/")
        parent = self.dir(head, create=True)
        try:
            return os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError:
            self._clear(parent, name, rel)
            return os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)

    def symlink(self, target: str, rel: str) -> None:
        head, _, name = rel.rpartition("/")
        parent = self.dir(head, create=True)
        try:
            os.symlink(target, name, dir_fd=parent)
        except FileExistsError:
            self._clear(parent, name, rel)
            os.symlink(target, name, dir_fd=parent)

    def chmod_dir(self, rel: str, mode: int) -> None:
        os.fchmod(self.dir(rel), safe_mode(mode))


def parents(rel: str) -> list[str]:
    """The folders above ``rel``, outermost first: ``a/b/c`` -> ``[a, a/b]``."""
    parts = PurePosixPath(rel).parts
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
