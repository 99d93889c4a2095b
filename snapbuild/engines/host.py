"""``host``: a plain process on this machine, checkpointed with ``criu dump -t PID``.

Restoring happens in a PID namespace of its own (runtime/pidns.py), so the original
PIDs need not be free here; it needs the same files at the same paths (the runner
materializes inputs at content-addressed paths).
"""

from __future__ import annotations

from pathlib import Path

from . import criu
from .fingerprint import host_fingerprint


class HostEngine:
    name = "host"

    def check(self) -> None:
        criu.binary()
        criu.check_version()

    def fingerprint(self) -> dict:
        return host_fingerprint(criu.version())

    def dump(self, pid: int, images: Path) -> None:
        criu.dump(pid, images)

    def restore(self, images: Path, work: Path, thp_fill: bool = False) -> int:
        return criu.restore(images, work=work, extra=[criu.THP_FILL] if thp_fill else [])

    def restore_lazily(self, images: Path, work: Path) -> tuple[int, criu.LazyPages]:
        return criu.restore_lazily(images, work=work)

    def lazy_unsupported(self) -> str | None:
        return criu.lazy_pages_unsupported()
