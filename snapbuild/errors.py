"""One exception hierarchy for the whole tool, with a fixed exit code per class.

Every error carries a message that says what happened and where, and an optional
``hint`` that says what to do next; the CLI prints both (``ERROR ...`` / ``TIP ...``).
Where a built-in exception fits, the class also inherits it, so callers can catch
``FileNotFoundError`` without knowing this module.
"""

from __future__ import annotations


#: Every exit status of ``snapbuild`` and ``snapbuild-runner``, one table for both (the
#: README's "Exit status" repeats it; a test keeps them equal). Each error class below
#: exits with one of these.
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "a check that found problems (`doctor`), or an error of no other kind",
    2: "usage: a bad option, reference or registry URL, or a port already taken",
    3: "recipe error, or a lock file that does not match (drift, or a pin an offline build needs)",
    4: "a step failed (or was skipped because of a failure)",
    5: "integrity: data that does not match its digest, or hostile content refused",
    6: "not found: no such snapshot, tag, step, log or process",
    7: "unreachable: a registry, or a step's source (the Hub, S3)",
    8: "checkpoint engine: CRIU or runc missing, too old, or failing",
    9: "not restored, and no cold boot (forbidden, or it failed too)",
    10: "untrusted: the trust policy refuses the snapshot",
    11: "node: a mount the server needs cannot be made",
    130: "interrupted",
}


def exit_codes_help(codes: tuple[int, ...] | None = None) -> str:
    """The table (or some of its codes) as a ``--help`` epilog."""
    return "Exit status:\n" + "\n".join(f"  {c:>3}  {EXIT_CODES[c]}" for c in (codes or tuple(EXIT_CODES)))


class SnapbuildError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(SnapbuildError):
    """Bad command-line input that click itself cannot catch."""

    exit_code = 2


class RecipeError(SnapbuildError):
    """A recipe that cannot be loaded: syntax, schema, references, cycles, templates.

    ``location`` is ``(file, line, column)`` with 1-based line and column when known,
    ``key_path`` the path of keys to the offending value, and ``source_line`` the text of
    that line, so the CLI can point at it.
    """

    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
        key_path: tuple = (),
        source_line: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.file = file
        self.line = line
        self.column = column
        self.key_path = tuple(key_path)
        self.source_line = source_line

    @property
    def where(self) -> str:
        parts = [self.file or "<recipe>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def __str__(self) -> str:
        keys = " -> ".join(str(k) for k in self.key_path)
        return f"{self.where}: {keys + ': ' if keys else ''}{self.message}"

    def render(self) -> str:
        """The message plus the offending line with a caret under the column."""
        out = [str(self)]
        if self.source_line is not None and self.line is not None:
            num = f"{self.line:>5} | "
            out.append(num + self.source_line.rstrip("\n"))
            if self.column is not None:
                out.append(" " * (len(num) - 2) + "| " + " " * (self.column - 1) + "^")
        return "\n".join(out)


class BuildFailed(SnapbuildError):
    """One or more steps failed; ``result`` holds the full build result."""

    exit_code = 4

    def __init__(self, message: str, *, result=None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result


class StepError(SnapbuildError):
    """Raised by a step kind when its work fails; the executor records it on the step."""

    exit_code = 4

    def __init__(self, message: str, *, log_tail: str | None = None, hint: str | None = None,
                 step: str | None = None):
        super().__init__(message, hint=hint)
        self.log_tail = log_tail
        #: the step really at fault, when not the one that raised (a warm-up inside a checkpoint)
        self.step = step


class SourceUnreachable(StepError):
    """A source of a step (the Hugging Face Hub, S3, a mirror) that cannot be reached:
    a name that does not resolve, a refused connection, a TLS error, a timeout. Exits
    like a registry that cannot be reached."""

    exit_code = 7


class MissingPin(SnapbuildError):
    """An offline build needs a floating reference's pin that the lock file does not
    hold. Exits like lock drift."""

    exit_code = 3


class IntegrityError(SnapbuildError):
    """Stored data does not match its digest: corruption, truncation or tampering."""

    exit_code = 5


class NodeError(SnapbuildError):
    """This node cannot set up what a server needs (a mount point taken or unusable):
    not the user's command line, not the snapshot."""

    exit_code = 11


class NotFound(SnapbuildError, LookupError):
    """A blob, artifact, tag, step or log that does not exist."""

    exit_code = 6


class RegistryError(SnapbuildError):
    """A registry that cannot be reached, read or written."""

    exit_code = 7


def render_error(e: SnapbuildError) -> str:
    """``ERROR what happened`` and, where there is one, ``TIP what to do``."""
    text = e.render() if isinstance(e, RecipeError) else str(e)
    out = f"ERROR {text}"
    if e.hint:
        out += f"\nTIP   {e.hint}"
    return out


def error_json(e: SnapbuildError) -> dict:
    """The error as ``--json`` prints it: ``{"error": {"type", "message", "exit_code", ...}}``."""
    err = {"type": type(e).__name__, "message": e.message, "exit_code": e.exit_code}
    if e.hint:
        err["hint"] = e.hint
    if isinstance(e, RecipeError):
        err.update(file=e.file, line=e.line, column=e.column, key_path=list(e.key_path))
    return {"error": err}
