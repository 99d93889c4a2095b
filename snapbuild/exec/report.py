"""Reporters: how a build shows its progress. The library never prints; it calls these.

- :class:`NullReporter`: nothing (library use, tests).
- :class:`PlainReporter`: one line per event, for logs and CI.
- :class:`RichReporter`: a live progress bar on a terminal.
- :class:`RecordingReporter`: keeps the events, for tests.

Registry transfers (``push``, ``pull``) show theirs the same two ways:
:func:`make_transfer_display` gives a live bar on a terminal, a line at most every
two seconds otherwise.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Protocol

from ..plan import Plan, PlannedStep, short


class Reporter(Protocol):
    def plan(self, plan: Plan) -> None: ...
    def step_started(self, step: PlannedStep) -> None: ...
    def step_done(self, result) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


class NullReporter:
    def plan(self, plan): pass
    def step_started(self, step): pass
    def step_done(self, result): pass
    def note(self, text): pass
    def close(self): pass


class RecordingReporter(NullReporter):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def step_started(self, step):
        self.events.append(("start", step.name))

    def step_done(self, result):
        self.events.append((result.status, result.name))


def _describe(result) -> str:
    text = f"{result.status:<7} {result.name} [{result.kind} {short(result.key)}]"
    if result.status == "built":
        text += f" {result.duration_s:.2f}s"
        if result.reason:
            text += f" ({result.reason})"
    elif result.status == "skipped" and result.reason:
        text += f" ({result.reason})"
    elif result.status == "failed":
        text += f": {result.error}"
    return text


class PlainReporter(NullReporter):
    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()

    def _line(self, text: str) -> None:
        self.stream.write(f"[{time.monotonic() - self.t0:6.1f}s] {text}\n")
        self.stream.flush()

    def plan(self, plan):
        n = len(plan.to_run)
        self._line(f"build {plan.recipe.build_id}: {len(plan.steps)} steps, {n} to run, "
                   f"{len(plan.steps) - n} cached")

    def step_started(self, step):
        self._line(f"start   {step.name} [{step.kind} {step.short_key}]")

    def note(self, text):
        self._line(text)

    def step_done(self, result):
        self._line(_describe(result))
        if result.status == "failed" and result.log_tail:
            for line in result.log_tail.rstrip("\n").splitlines():
                self.stream.write(f"    | {line}\n")
        if result.status == "failed" and result.hint:
            self.stream.write(f"    tip: {result.hint}\n")


class RichReporter(NullReporter):
    def __init__(self, stream: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(file=stream or sys.stderr)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                                 transient=True)
        self.task = None
        self.running: list[str] = []

    def plan(self, plan):
        self.progress.start()
        self.task = self.progress.add_task(plan.recipe.build_id, total=len(plan.steps),
                                           completed=len(plan.steps) - len(plan.to_run))

    def _describe_running(self):
        desc = ", ".join(self.running[:3]) + (" ..." if len(self.running) > 3 else "")
        self.progress.update(self.task, description=desc or "done")

    def step_started(self, step):
        self.running.append(step.name)
        self._describe_running()

    def step_done(self, result):
        if result.name in self.running:
            self.running.remove(result.name)
        style = {"built": "green", "failed": "bold red", "skipped": "yellow"}.get(result.status, "")
        self.console.print(_describe(result), style=style, markup=False, highlight=False)
        if result.status == "failed" and result.log_tail:
            self.console.print(result.log_tail.rstrip("\n"), style="dim", markup=False, highlight=False)
        if result.status == "failed" and result.hint:
            self.console.print(f"tip: {result.hint}", style="cyan", markup=False, highlight=False)
        self.progress.advance(self.task)
        self._describe_running()

    def note(self, text):
        self.console.print(text, style="dim", markup=False, highlight=False)

    def close(self):
        self.progress.stop()


def make_reporter(mode: str, stream: IO[str] | None = None) -> Reporter:
    """``auto`` picks the live display on a terminal and plain lines elsewhere."""
    stream = stream or sys.stderr
    if mode == "auto":
        mode = "tty" if stream.isatty() else "plain"
    if mode == "tty":
        return RichReporter(stream)
    if mode == "none":
        return NullReporter()
    return PlainReporter(stream)


class PlainTransfer:
    """``progress(verb, blobs, size)`` for registry transfers, as lines: at most one
    every ``every`` seconds, and the last (``sent 1200/14702 blobs, 118.3 MiB``)."""

    def __init__(self, stream: IO[str] | None = None, every: float = 2.0) -> None:
        self.stream, self.every = stream or sys.stderr, every
        self.lock = threading.Lock()
        self.verb: str | None = None
        self.count = self.bytes = 0
        self.last = time.monotonic()

    def _count(self, verb: str, size: int) -> None:
        if verb != self.verb:
            self.verb, self.count, self.bytes = verb, 0, 0
            self._new_verb(verb)
        self.count += 1
        self.bytes += size

    def _new_verb(self, verb: str) -> None:
        pass

    def __call__(self, verb: str, total: int, size: int) -> None:
        with self.lock:
            self._count(verb, size)
            now = time.monotonic()
            if now - self.last >= self.every or self.count == total:
                self.last = now
                self.stream.write(f"{verb} {self.count}/{total} blobs, {self.bytes / 2**20:.1f} MiB\n")
                self.stream.flush()

    def close(self) -> None:
        pass


class RichTransfer(PlainTransfer):
    """The same, as a live bar: blobs done of blobs to move, bytes and rate."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        super().__init__(stream)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("blobs {task.fields[moved]}"),
                                 TimeElapsedColumn(), console=Console(file=self.stream), transient=False)
        self.task = None
        self.t0 = time.monotonic()

    def _new_verb(self, verb: str) -> None:
        if self.task is None:
            self.progress.start()
        self.task = self.progress.add_task(verb, total=None, moved="")
        self.t0 = time.monotonic()

    def __call__(self, verb: str, total: int, size: int) -> None:
        with self.lock:
            self._count(verb, size)
            rate = self.bytes / max(time.monotonic() - self.t0, 1e-3)
            self.progress.update(self.task, total=total, completed=self.count,
                                 moved=f"{self.bytes / 2**20:.1f} MiB, {rate / 2**20:.1f} MiB/s")

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


class NullTransfer(PlainTransfer):
    def __call__(self, verb: str, total: int, size: int) -> None:
        pass


def make_transfer_display(mode: str, stream: IO[str] | None = None) -> PlainTransfer:
    """``auto``: the live bar on a terminal, lines elsewhere; ``none``: nothing."""
    stream = stream or sys.stderr
    if mode == "auto":
        mode = "tty" if stream.isatty() else "plain"
    if mode == "tty":
        return RichTransfer(stream)
    if mode == "none":
        return NullTransfer(stream)
    return PlainTransfer(stream)
