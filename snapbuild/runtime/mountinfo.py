"""What is mounted where in this mount namespace, from ``/proc/self/mountinfo``.

A leaf: standard library only. (``os.path.ismount`` misses a bind mount from the
same file system, since it compares devices; these read the kernel's own table.)
"""

from __future__ import annotations

import os
from pathlib import Path


def mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, root within its file system, file system type) of every mount of
    this namespace, from /proc/self/mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        f = line.split(" ")
        _, sep, rest = line.partition(" - ")
        if len(f) > 4:
            out.append((f[4].encode().decode("unicode_escape"), f[3], rest.split(" ", 1)[0] if sep else ""))
    return out


def mount_points() -> list[Path]:
    """This namespace's mount points."""
    return [Path(point) for point, _, _ in mountinfo()]


def source_deleted(dest: Path) -> bool:
    """Whether the mount at ``dest`` shows a folder that has been deleted (mountinfo
    marks its root ``//deleted``): nothing of value is there any more."""
    where = os.path.realpath(dest)
    return any(point == where and root.endswith("//deleted") for point, root, _ in mountinfo())


def fs_type(path: Path) -> str | None:
    """The file system type of the mount at ``path`` (the last one, if several are
    stacked there), or None when nothing is mounted there."""
    where = os.path.realpath(path)
    types = [fstype for point, _, fstype in mountinfo() if point == where]
    return types[-1] if types else None


def is_mount_point(path: Path) -> bool:
    return Path(os.path.realpath(path)) in mount_points()
