"""Checkpoint engines behind one small protocol, registered by name, imported lazily.

Only the standard library and the store are used here: the runner imports engines.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

_ENGINES = {
    "host": "snapbuild.engines.host:HostEngine",
    "runc": "snapbuild.engines.oci:OciEngine",
    "runsc": "snapbuild.engines.oci:RunscEngine",
}


class Engine(Protocol):
    name: str

    def check(self) -> None:
        """Raise a SnapbuildError with a hint when the engine cannot work here."""

    def fingerprint(self) -> dict:
        """What a checkpoint made here assumes about the machine (see fingerprint.py)."""

    def dump(self, pid: int, images: Path) -> None:
        """Checkpoint the process tree rooted at ``pid`` into ``images``; it ends after."""

    def restore(self, images: Path, work: Path) -> int:
        """Bring the process tree back, detached; returns its root PID."""

CONTAINER_ENGINES = ("runc", "runsc")


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def get_engine(name: str) -> Engine:
    module, _, cls = _ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
