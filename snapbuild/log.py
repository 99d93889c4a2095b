"""Logging for both command lines and the node agent: stdlib :mod:`logging`, on stderr.

Modules log with ``logging.getLogger(__name__)``; every fallback (a cold boot instead
of a restore, a copy instead of an overlay mount, trees written out instead of
mounted, a local image instead of a pulled one) and every retry is a WARNING with its
reason, so none of them passes unseen. What is shown:

- WARNING and up by default; ``-v`` adds INFO, ``-vv`` DEBUG;
- ``SNAPBUILD_LOG=debug|info|warning|error`` sets the level where no ``-v`` is given
  (a ``-v`` can only show more);
- a line reads ``WARNING what happened`` (``DEBUG snapbuild.module: ...`` at debug),
  like the ``ERROR``/``TIP`` lines; the agent writes JSON lines instead, as its own
  events are (``{"ts", "event": "log", "level", "logger", "message"}``).
"""

from __future__ import annotations

import json
import logging
import sys

from .errors import UsageError

ROOT = "snapbuild"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def level(verbose: int = 0) -> int:
    """The level for ``verbose`` ``-v`` flags and ``$SNAPBUILD_LOG``."""
    from . import settings

    name = str(settings.get("log") or "warning").strip().lower()
    if name not in LEVELS:
        raise UsageError(f"SNAPBUILD_LOG={name!r} is not a log level",
                         hint=f"use one of {', '.join(LEVELS)} (or -v, -vv)")
    if not verbose:
        return LEVELS[name]
    return min(LEVELS[name], logging.INFO if verbose == 1 else logging.DEBUG)


class _Lines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno < logging.INFO:
            text = f"{record.name}: {text}"
        return f"{record.levelname} {text}"


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": round(record.created, 3), "event": "log", "level": record.levelname.lower(),
                           "logger": record.name, "message": record.getMessage()}, default=str)


_HANDLER: logging.Handler | None = None


def setup(verbose: int = 0, *, json_lines: bool = False) -> int:
    """Send the ``snapbuild`` loggers' records to stderr at the chosen level (again:
    a later call replaces the earlier one). Returns the level."""
    global _HANDLER
    lvl = level(verbose)
    root = logging.getLogger(ROOT)
    if _HANDLER is not None:
        root.removeHandler(_HANDLER)
    _HANDLER = _StderrHandler()
    _HANDLER.setFormatter(_JsonLines() if json_lines else _Lines())
    root.addHandler(_HANDLER)
    root.setLevel(lvl)
    root.propagate = False
    from . import settings

    settings.warn_removed()  # keys of an old settings file, read before there was a handler to show them
    return lvl


class _StderrHandler(logging.StreamHandler):
    """Whatever ``sys.stderr`` is when a record is written (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)
