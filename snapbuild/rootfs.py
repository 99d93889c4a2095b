"""Root filesystems from OCI layers: safe unpacking, a per-layer cache, and assembly.

Shared by the builder and the runner (standard library only). Each layer is unpacked
once per machine into ``CACHE/<hex>/`` in overlayfs's own form (an OCI whiteout
``.wh.NAME`` becomes a 0/0 character device, an opaque ``.wh..wh..opq`` the
``trusted.overlay.opaque`` xattr); a root filesystem is then an overlay mount of the
cached layers, or, where overlayfs is unavailable, a copy that applies the same
whiteouts in order.

Layers are untrusted input; unpacking follows the model of Python's ``tarfile`` data
filter (PEP 706). It refuses, with the offending entry named: absolute paths and
``..``; entries whose parent folder is a symlink (writing through it could land
outside the root); hard links to anything but a file of this layer; device nodes;
whiteouts of anything but a plain name (``.wh..``, ``.wh...``); ``trusted.*``
extended attributes (overlayfs metadata). setuid and setgid bits are dropped
(:func:`layer_mode`; a folder's sticky bit is kept: it makes ``/tmp`` safer, not
less); file capabilities and ``user.*`` attributes are restored (:func:`layer_xattrs`),
in a layer cache only root may enter. Symlinks themselves may point anywhere: they are
resolved inside the container.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from collections.abc import Iterable

from . import tools
from .errors import IntegrityError, SnapbuildError
from .runtime import erofs, layout
from .store.fsutil import ParallelWrites, flock, remove_tree, walk

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
MARKER = layout.LAYER_MARKER


class UnsafeLayer(IntegrityError):
    """A layer entry that could write outside the root or create a device."""


def layer_mode(mode: int, is_dir: bool = False) -> int:
    """The mode a layer's entry is written with: no setuid or setgid bit, ever (a layer
    from a registry never makes a setuid-root file on the machine); sticky only on
    folders."""
    return mode & (0o1777 if is_dir else 0o777)


def _clean(name: str, layer: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise UnsafeLayer(f"layer {layer}: entry {name!r} points outside the root filesystem",
                          hint="the layer is malformed or malicious; rebuild it from a trusted source")
    parts = [x for x in p.parts if x not in (".", "")]
    return "/".join(parts)


def _parent_is_safe(dest: Path, rel: str, known_dirs: set[str]) -> bool:
    """No component of rel's parent, inside dest, is a symlink (or a non-folder)."""
    parent = rel.rpartition("/")[0]
    parts = parent.split("/") if parent else []
    for i in range(len(parts)):
        sub = "/".join(parts[: i + 1])
        if sub in known_dirs:
            continue
        path = dest / sub
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            path.mkdir(mode=0o755)
            known_dirs.add(sub)
            continue
        if not stat.S_ISDIR(st.st_mode):
            return False
        known_dirs.add(sub)
    return True


def unpack(stream: BinaryIO, dest: Path, *, layer: str = "layer") -> None:
    """Unpack one uncompressed tar layer into ``dest`` (overlay form), refusing unsafe entries.

    Small files are written on a few threads (see fsutil.ParallelWrites); anything that
    touches a path still being written waits for it first.
    """
    dest.mkdir(parents=True, exist_ok=True)
    known_dirs: set[str] = set()
    dir_times: list[tuple[Path, int]] = []
    chown = os.geteuid() == 0
    with ParallelWrites() as writes, tarfile.open(fileobj=stream, mode="r|") as tar:
        def remove(path: Path) -> None:
            """Whatever is at ``path`` before an entry takes its place (called for every
            entry but folders: on a fresh layer there is nothing, and that costs one lstat)."""
            writes.wait(path)  # a file of this name still being written
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
            if stat.S_ISDIR(st.st_mode):
                writes.drain()  # files being written below it
                # What was a folder here may become a symlink: it is checked again when used.
                gone = path.relative_to(dest).as_posix()
                known_dirs.difference_update({d for d in known_dirs if d == gone or d.startswith(gone + "/")})
            _remove(path)

        for m in tar:
            rel = _clean(m.name, layer)
            if not rel:
                continue
            if m.ischr() or m.isblk():
                raise UnsafeLayer(f"layer {layer}: entry {m.name!r} is a device node; layers may not create devices")
            if not _parent_is_safe(dest, rel, known_dirs):
                raise UnsafeLayer(f"layer {layer}: entry {m.name!r} would be written through a symlink "
                                  "(a link in its path could lead outside the root)")
            parent, _, base = rel.rpartition("/")
            target = dest / rel
            if base == OPAQUE:
                os.setxattr(dest / parent if parent else dest, OPAQUE_XATTR, b"y")
                continue
            if base.startswith(WHITEOUT):
                name = base[len(WHITEOUT):]
                if name in ("", ".", "..") or name.startswith(WHITEOUT):
                    raise UnsafeLayer(f"layer {layer}: whiteout {m.name!r} does not name an entry of its folder")
                gone = dest / parent / name if parent else dest / name
                remove(gone)
                os.mknod(gone, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                continue
            if not m.isdir():
                remove(target)
            xattrs = layer_xattrs(m, layer) if m.pax_headers else []
            if m.isreg() and m.size <= SMALL_FILE:
                data = tar.extractfile(m).read()
                writes.submit(target, lambda t=target, d=data, m=m, x=xattrs: _write_member(t, d, m, chown, x),
                              len(data))
                continue
            if m.isdir():
                if os.path.islink(target) or (os.path.lexists(target) and not target.is_dir()):
                    remove(target)
                target.mkdir(exist_ok=True)
                os.chmod(target, layer_mode(m.mode, is_dir=True))
                known_dirs.add(rel)
            elif m.issym():
                os.symlink(m.linkname, target)
            elif m.islnk():
                src = _clean(m.linkname, layer)
                if src:
                    writes.wait(dest / src)
                if not src or not os.path.lexists(dest / src) or not _parent_is_safe(dest, src, known_dirs) \
                        or os.path.islink(dest / src):
                    raise UnsafeLayer(f"layer {layer}: hard link {m.name!r} -> {m.linkname!r} does not name a "
                                      "file of this layer")
                os.link(dest / src, target)
            elif m.isfifo():
                os.mkfifo(target, layer_mode(m.mode))
            elif m.isreg():
                with tar.extractfile(m) as f, _create(target) as out:
                    shutil.copyfileobj(f, out, 1 << 20)
                os.chmod(target, layer_mode(m.mode))
            else:
                continue
            if not m.issym() and chown:
                os.lchown(target, m.uid, m.gid)
            if not m.issym() and not m.islnk():
                _set_xattrs(target, xattrs)
            # Times matter: Python trusts a .pyc only when its source's mtime matches.
            if m.isdir():
                dir_times.append((target, int(m.mtime)))
            elif not m.islnk():
                os.utime(target, (int(m.mtime), int(m.mtime)), follow_symlinks=False)
    for path, mtime in reversed(dir_times):  # after their content: writing a child changes them
        os.utime(path, (mtime, mtime))


SMALL_FILE = 8 << 20  # regular files up to this size are written on the writer threads

# Extended attributes a layer may set (from its pax headers, as image.layers keeps
# them): file capabilities (ping's cap_net_raw) and the user namespace. ``trusted.*``
# is refused: overlayfs reads its own metadata there (whiteouts, opaque folders,
# redirects to other paths), which only the unpacker itself may write.
XATTR_PAX = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")
XATTRS_KEPT = ("security.capability",)
XATTR_PREFIXES_KEPT = ("user.",)


def layer_xattrs(m: tarfile.TarInfo, layer: str) -> list[tuple[str, bytes]]:
    """The extended attributes of a layer's entry that are restored on unpack."""
    import base64

    out = []
    for key, value in m.pax_headers.items():
        prefix = next((p for p in XATTR_PAX if key.startswith(p)), None)
        if prefix is None:
            continue
        name = key[len(prefix):]
        if name.startswith("trusted."):
            raise UnsafeLayer(f"layer {layer}: entry {m.name!r} sets {name}, which only the unpacker may set "
                              "(overlayfs metadata)")
        if name in XATTRS_KEPT or name.startswith(XATTR_PREFIXES_KEPT):
            raw = value.encode("utf-8", "surrogateescape")
            out.append((name, base64.b64decode(raw) if prefix == "LIBARCHIVE.xattr." else raw))
    return out


def _set_xattrs(target: Path, xattrs: list[tuple[str, bytes]]) -> None:
    """After chown, which clears file capabilities."""
    for name, value in xattrs:
        os.setxattr(target, name, value, follow_symlinks=False)


def _create(target: Path) -> BinaryIO:
    """A new file at ``target``, never opened through a symlink there."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb")


def _write_member(target: Path, data: bytes, m: tarfile.TarInfo, chown: bool,
                  xattrs: list[tuple[str, bytes]]) -> None:
    with _create(target) as out:
        out.write(data)
    os.chmod(target, layer_mode(m.mode))
    if chown:
        os.lchown(target, m.uid, m.gid)
    _set_xattrs(target, xattrs)
    os.utime(target, (int(m.mtime), int(m.mtime)))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    elif os.path.lexists(path):
        path.unlink()


def cached_layer(digest: str, open_layer, cache: Path, *, user: str | None = None, mount_image=None) -> Path:
    """The layer's folder in ``cache``, unpacked (once) from ``open_layer()`` if needed,
    or, with ``mount_image``, mounted from the layer's tree image by
    ``mount_image(folder)`` (see runtime.erofs). ``user`` (a store's path) is
    recorded in the layer's marker, for :func:`release_layer`."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise UnsafeLayer(f"layer {digest!r} is not named by a sha256 digest", hint="the image is malformed or "
                          "malicious; rebuild it from a trusted source")
    # Root only: layers keep file capabilities, which nobody else may reach and run.
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(cache, 0o700)
    final = cache / hexpart
    marker = layout.layer_marker(cache, hexpart)
    line = f"{user}\n" if user else ""
    try:
        users = marker.read_text().splitlines(keepends=True)
        if (not line or line in users) and _layer_present(final):
            return final
    except FileNotFoundError:
        pass
    with flock(layout.layer_lock(cache, hexpart)):
        if marker.exists() and _layer_present(final):
            if line and line not in marker.read_text().splitlines(keepends=True):
                with open(marker, "a") as f:
                    f.write(line)
            return final
        # (a marker without its mount: the layer's image is mounted again, its users kept)
        users = marker.read_text().splitlines(keepends=True) if marker.exists() else []
        marker.unlink(missing_ok=True)
        tmp = layout.layer_partial(cache, hexpart)
        remove_tree(tmp, ignore_errors=True)
        forget_layer(final)
        if mount_image is not None:
            mount_image(final)
        else:
            with open_layer() as stream:
                unpack(stream, tmp, layer=digest)
            os.rename(tmp, final)
        marker.write_text("".join(users) + (line if line not in users else ""))  # beside it: the layer stays untouched
    return final


def _layer_present(path: Path) -> bool:
    """False for a layer mounted from its image whose mount is gone (a reboot)."""
    return os.path.ismount(path) or not layout.image_file(path).exists()


def release_layer(cache: Path, hexpart: str, user: str, *, dry_run: bool = False) -> bool | None:
    """Drop ``user`` from a cached layer's users and remove the layer when no user that
    still exists is left. True when removed, False when kept, None when not ``user``'s."""
    marker = layout.layer_marker(cache, hexpart)
    with flock(layout.layer_lock(cache, hexpart)):
        try:
            users = marker.read_text().splitlines()
        except FileNotFoundError:
            return None
        if user not in users:
            return None
        others = [u for u in users if u != user and os.path.isdir(u)]
        if dry_run:
            return not others
        if others:
            marker.write_text("".join(u + "\n" for u in others))
            return False
        forget_layer(cache / hexpart)  # first: a mount still in use keeps its marker
        marker.unlink()
        return True


def forget_layer(path: Path) -> None:
    """Remove an unpacked layer, or unmount a layer mounted from its image (and delete
    the image file: see runtime.erofs)."""

    if os.path.ismount(path):
        erofs.take_down(path)
    remove_tree(path, ignore_errors=True)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def copy_assemble(layers: Iterable[Path], dest: Path) -> None:
    """Apply cached layers (lowest first) into ``dest`` by copying, honouring whiteouts
    and opaque folders: the fallback where overlayfs is unavailable."""
    dest.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        for dirpath, dirnames, filenames in walk(layer):
            rel = os.path.relpath(dirpath, layer)
            out = dest if rel == "." else dest / rel
            try:
                if os.getxattr(dirpath, OPAQUE_XATTR) == b"y" and out.is_dir() and not out.is_symlink():
                    for child in out.iterdir():
                        _remove(child)
            except OSError:
                pass
            for name in list(dirnames):
                src, dst = Path(dirpath, name), out / name
                if src.is_symlink():
                    _remove(dst)
                    os.symlink(os.readlink(src), dst)
                    dirnames.remove(name)
                    continue
                # A symlink a lower layer left here is replaced, never followed: is_dir()
                # alone follows it, and this layer's files would be copied to where it points.
                if os.path.lexists(dst) and (dst.is_symlink() or not dst.is_dir()):
                    _remove(dst)
                dst.mkdir(exist_ok=True)
                shutil.copystat(src, dst)
            for name in filenames:
                src, dst = Path(dirpath, name), out / name
                st = os.lstat(src)
                _remove(dst)
                if _is_whiteout(st):
                    continue
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(src), dst)
                elif stat.S_ISFIFO(st.st_mode):
                    os.mkfifo(dst, stat.S_IMODE(st.st_mode))
                else:
                    shutil.copy2(src, dst)


def overlay_mount(layers: list[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount ``layers`` (lowest first) read-only under a writable ``upper`` at ``target``."""
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    lower = ":".join(str(p) for p in reversed(layers))
    r = tools.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                   str(target)], what=f"overlay mount at {target}")
    if r.returncode != 0:
        raise SnapbuildError(f"overlay mount failed: {r.stderr.strip()}")


def assemble(layers: list[Path], dest: Path, *, work: Path | None = None) -> str:
    """A root filesystem at ``dest`` from cached layers: an overlay mount when the kernel
    allows it (needs root), else a copy. Returns ``"overlay"`` or ``"copy"``."""
    if os.geteuid() == 0 and work is not None:
        try:
            overlay_mount(layers, work / "upper", work / "work", dest)
            return "overlay"
        except SnapbuildError as e:
            log.warning("%s; copying the layers to %s instead (slower, and it takes disk space)", e.message, dest)
    else:
        log.info("root filesystem at %s: copying the layers (an overlay mount needs root)", dest)
    copy_assemble(layers, dest)
    return "copy"
