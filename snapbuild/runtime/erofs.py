"""Tree images: a big tree shipped as one EROFS file system image, mounted on the node.
This module holds what a node does with them (and ``make``, which the build calls);
the build's choice of which trees get one is :mod:`snapbuild.image.tree_images`.

Writing a Python environment out file by file (15,000 files, most of a restore on an
empty node) costs seconds that a node does not need to spend: the build makes an
EROFS image of each input tree and image layer with many files (``mkfs.erofs``, made
deterministic: fixed time stamps and UUID, so the same tree always gives the same
image and a new version re-sends nothing for an unchanged tree; file data compressed
with lz4, which the kernel undoes a block at a time as the server reads it), stores it
as a one-file tree (chunked and verified like any other), and names it in the snapshot's
config (``tree_images``, see docs/format.md). A node whose kernel mounts EROFS (Linux
5.4 and later, through a loop device that ``mount`` sets up) fetches the image
instead of the tree's own chunks, writes it as one file and mounts it read-only at the
tree's usual path: the server sees the same bytes at the same paths, which is all CRIU
needs. A node that cannot mount it fetches the tree and writes it out as before.

The kernel parses an image when it mounts it, so a node mounts images only from
snapshots a trust policy accepted (signed by an accepted key); the trees of any other
snapshot are written out. ``SNAPBUILD_TREE_IMAGES=always`` mounts them from unverified
snapshots too (a node that trusts its registry); ``SNAPBUILD_TREE_IMAGES=0`` turns
images off, at build (none are made) and on nodes (none are used). An image is
mounted read-only, ``nosuid`` and ``nodev``, and only once its blob is an EROFS
image of the size it says (:func:`image_problem`). ``SNAPBUILD_MKFS_EROFS`` names
the mkfs.erofs to use.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .. import tools
from ..errors import IntegrityError, SnapbuildError, UsageError
from . import layout, process
from .mountinfo import fs_type

log = logging.getLogger(__name__)

FORMAT = "erofs"
FILE = "tree.erofs"  # the image tree's one file
MIN_ENTRIES = 256  # trees with fewer files are written out as they are: nothing to gain
UUID = "00000000-0000-0000-0000-000000000000"


class ImageUnusable(SnapbuildError):
    """A tree image could not be mounted on this node: write the tree out instead."""


def enabled() -> bool:
    return _tree_images() not in ("0", "no", "false", "off")


def _tree_images() -> str:
    """The node setting ``tree_images`` (``$SNAPBUILD_TREE_IMAGES``): on, off or always."""
    from .. import settings

    return str(settings.get("tree_images")).strip().lower()


def refused_for(trust: dict | None) -> str | None:
    """Why a snapshot's tree images are not mounted, given what the trust policy said
    of it (pull's ``trust``); None: they may be."""
    if (trust or {}).get("trusted") or _tree_images() == "always":
        return None
    return ("the snapshot is not verified by a trust policy, and the kernel parses an image it mounts "
            "(SNAPBUILD_TREE_IMAGES=always mounts them anyway)")


#: How the build compresses an image's file data: ``lz4`` (the kernel decompresses a
#: block when it is first read, so a node writes out half the bytes and reads only
#: what the server touches) or ``none``. ``$SNAPBUILD_TREE_IMAGE_COMPRESSION``.
COMPRESSIONS = ("lz4", "none")
DEFAULT_COMPRESSION = "lz4"


def compression() -> str:
    choice = os.environ.get("SNAPBUILD_TREE_IMAGE_COMPRESSION") or DEFAULT_COMPRESSION
    if choice not in COMPRESSIONS:
        raise UsageError(f"SNAPBUILD_TREE_IMAGE_COMPRESSION must be one of {', '.join(COMPRESSIONS)}, "
                         f"not {choice!r}")
    return choice


SUPERBLOCK_OFFSET = 1024
MAGIC = 0xE0F5E1E2


def image_problem(head: bytes, size: int) -> str | None:
    """Why a file whose first bytes are ``head`` and whose size is ``size`` is not an
    EROFS image (None: it is one): the superblock's magic, and its block count times
    its block size equal to the file's size."""
    sb = head[SUPERBLOCK_OFFSET:SUPERBLOCK_OFFSET + 128]
    if len(sb) < 40 or int.from_bytes(sb[0:4], "little") != MAGIC:
        return "it has no EROFS superblock"
    blkszbits, blocks = sb[12], int.from_bytes(sb[36:40], "little")
    if not 9 <= blkszbits <= 16 or blocks << blkszbits != size:
        return f"its superblock says {blocks} blocks of {1 << blkszbits if blkszbits < 32 else '?'} bytes, the file holds {size}"
    return None


def _mkfs() -> str | None:
    """mkfs.erofs: ``$SNAPBUILD_MKFS_EROFS`` when set, else the one on ``PATH``."""
    from .. import settings

    return shutil.which(str(settings.get("mkfs_erofs") or "mkfs.erofs"))


def can_build() -> bool:
    return enabled() and _mkfs() is not None


def can_mount() -> bool:
    """Whether this node may use tree images: enabled, root, and EROFS in the kernel."""
    if not enabled() or os.geteuid() != 0:
        log.info("tree images not used: %s", "turned off" if not enabled() else "mounting them needs root")
        return False
    try:
        found = any(line.split()[-1] == FORMAT for line in Path("/proc/filesystems").read_text().splitlines()
                    if line.strip())
    except OSError:
        found = False
    if not found:
        log.info("tree images not used: this kernel has no %s (modprobe erofs)", FORMAT)
    return found


def make(src: Path, out: Path, *, exclude: tuple[str, ...] = (), keep_owners: bool = False) -> None:
    """Write an EROFS image of the folder ``src`` to ``out``, deterministically: a fixed
    UUID and build time; with ``keep_owners`` (a layer) owners and modification times
    as they are, else (an input tree, whose times are when it was written out) every
    time 0 and every file owned by root. File data is compressed as
    :func:`compression` says."""
    lz4 = compression() == "lz4"
    args = [_mkfs() or "mkfs.erofs", "--quiet", f"-U{UUID}", *(["-zlz4"] if lz4 else [])]
    env = dict(os.environ)
    if keep_owners:
        # SOURCE_DATE_EPOCH fixes the build time; far in the future, it clamps no file's time.
        args.append("--preserve-mtime")
        env["SOURCE_DATE_EPOCH"] = "4102444800"
    else:
        args += ["-T0", "--ignore-mtime", "--all-root"]
    args += [f"--exclude-path={p}" for p in exclude]
    hint = "set SNAPBUILD_TREE_IMAGES=0 to build snapshots without tree images" + (
        " (or SNAPBUILD_TREE_IMAGE_COMPRESSION=none, for a mkfs.erofs built without lz4)" if lz4 else "")
    r = tools.run([*args, str(out), str(src)], tool="mkfs.erofs", what=f"mkfs.erofs of {src}", env=env, hint=hint)
    if r.returncode != 0:
        raise SnapbuildError(f"mkfs.erofs could not make an image of {src}: "
                             f"{(r.stderr or r.stdout).strip()[-500:] or 'exit status ' + str(r.returncode)}",
                             hint=hint)


def mount(image: Path, dest: Path) -> None:
    """Mount ``image`` read-only at ``dest``. ``mount`` backs a file with a loop device
    of its own (released at unmount); where that is not automatic, ``-o loop`` asks
    for one. Raises :class:`ImageUnusable` when neither works."""
    dest.mkdir(parents=True, exist_ok=True)
    errors = []
    for opts in ("ro,nosuid,nodev", "ro,nosuid,nodev,loop"):
        r = tools.run(["mount", "-t", FORMAT, "-o", opts, str(image), str(dest)],
                      what=f"mount of the tree image {image}", error=ImageUnusable)
        if r.returncode == 0:
            return
        errors.append(r.stderr.strip() or f"mount -o {opts} failed")
    raise ImageUnusable(f"cannot mount the tree image {image}: {errors[-1]}")


def unmount(dest: Path) -> bool:
    """Unmount a tree image; True when nothing is mounted there (any more), False when
    it is still in use (a server maps its files) or something else is mounted there."""
    if not is_image_mount(dest):
        return not os.path.ismount(dest)  # another file system there is not ours to take away
    if process.users_in_other_mount_namespaces(dest):  # a restored host server's copy of it (runtime.pidns)
        return False
    try:
        return tools.run(["umount", str(dest)], what=f"unmount of {dest}").returncode == 0
    except SnapbuildError:  # timed out: still in use as far as anyone can tell
        return False


def is_image_mount(path: Path) -> bool:
    """Whether ``path`` is the mount point of an EROFS file system (a tree image, or a
    bind mount of one)."""
    return fs_type(path) == FORMAT


def take_down(folder: Path) -> None:
    """Unmount the image mounted at ``folder`` and delete its file. Raises when a
    process still uses it, or when another file system is mounted there (never ours to
    take away, nor to empty)."""
    if not unmount(folder):
        if is_image_mount(folder):
            raise SnapbuildError(f"cannot unmount the image at {folder}: it is in use",
                                 hint="stop the servers that use it first")
        raise SnapbuildError(f"cannot unmount the image at {folder}: another file system is mounted there",
                             hint=f"unmount it (`umount {folder}`) if nothing needs it")
    layout.image_file(folder).unlink(missing_ok=True)


def write_image(blobs, image_tree: str, dest: Path) -> None:
    """Write the image file of the one-file tree ``image_tree`` to ``dest`` (verified,
    complete before it appears under its name)."""
    from ..store.chunks import write_file
    from ..store.tree import load_tree

    entries = [e for e in load_tree(blobs, image_tree)["entries"] if e["type"] == "file"]
    if len(entries) != 1 or entries[0]["path"] != FILE:
        raise SnapbuildError(f"{image_tree} is not a tree image (it should hold only {FILE})")
    layout.secure_dir(dest.parent)  # trusted once written: nobody else may write there
    tmp = layout.image_partial(dest)
    write_file(blobs, entries[0], tmp, mode=0o444)
    with open(tmp, "rb") as f:
        why = image_problem(f.read(SUPERBLOCK_OFFSET + 128), os.fstat(f.fileno()).st_size)
    if why:
        tmp.unlink()
        raise IntegrityError(f"tree image {image_tree} is not an EROFS image: {why}; refusing to mount it",
                             hint="the registry holds a corrupt or hostile snapshot; do not use it")
    os.rename(tmp, dest)


def mount_tree(blobs, image_tree: str, dest: Path) -> None:
    """Write out ``image_tree`` (unless its file is already there: layout.image_file) and
    mount it at the tree or layer folder ``dest``."""
    path = layout.image_file(dest)
    if not path.is_file():
        write_image(blobs, image_tree, path)
    try:
        mount(path, dest)
    except ImageUnusable:
        path.unlink(missing_ok=True)
        raise
