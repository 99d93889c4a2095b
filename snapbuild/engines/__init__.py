"""Checkpoint engines behind one small protocol, registered by name, imported lazily.

Only the standard library and the store are used here: the runner imports engines.
"""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from .criu import LazyPages

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


class ProcessEngine(Engine, Protocol):
    """``host``: a process tree of this machine, checkpointed by CRIU."""

    def dump(self, pid: int, images: Path) -> None:
        """Checkpoint the process tree rooted at ``pid`` into ``images``; it ends after."""

    def restore(self, images: Path, work: Path, thp_fill: bool = False) -> int:
        """Bring the process tree back, detached; returns its root PID. ``thp_fill``: its
        private memory read into huge pages (criu.thp_fill_unused)."""

    def restore_lazily(self, images: Path, work: Path) -> tuple[int, LazyPages]:
        """:meth:`restore`, its memory served on demand by the returned daemon, which the
        caller waits for (criu.LazyPages)."""

    def lazy_unsupported(self) -> str | None:
        """None when :meth:`restore_lazily` can work here, else why not."""


class ContainerEngine(Engine, Protocol):
    """``runc``, ``runsc``: an OCI runtime, its containers checkpointed by it."""

    global_flags: list[str]

    def path(self) -> str: ...
    def option_flags(self, options: dict) -> list[str]: ...
    def run(self, bundle: Path, cid: str, options: dict | None = None) -> None: ...
    def checkpoint(self, cid: str, images: Path, work: Path, options: dict | None = None) -> None: ...
    def restore(self, bundle: Path, cid: str, images: Path, work: Path, options: dict | None = None) -> None: ...
    def exec(self, cid: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess: ...
    def state(self, cid: str) -> dict | None: ...
    def pause(self, cid: str) -> None: ...
    def resume(self, cid: str) -> None: ...
    def delete(self, cid: str) -> None: ...


CONTAINER_ENGINES = ("runc", "runsc")


def engine_names() -> list[str]:
    return sorted(_ENGINES)


def get_engine(name: str) -> Engine:
    module, _, cls = _ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def process_engine(name: str) -> ProcessEngine:
    if name in CONTAINER_ENGINES:
        raise ValueError(f"{name} is a container engine")
    return cast(ProcessEngine, get_engine(name))


def container_engine(name: str) -> ContainerEngine:
    if name not in CONTAINER_ENGINES:
        raise ValueError(f"{name} is not a container engine")
    return cast(ContainerEngine, get_engine(name))
