"""Which process a recorded PID is: (pid, start time, boot id).

A PID alone names a process only while it lives: once it exits the kernel hands the
number to the next process, and after a reboot every number starts over. The agent
records a server as a :class:`ProcessIdentity` and, before it adopts, signals or
stops one, checks all three: the PID, the start time the kernel gives it
(``/proc/PID/stat`` field 22, clock ticks since boot) and the boot id
(``/proc/sys/kernel/random/boot_id``). A process that differs in any of them is not
the one recorded and is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def boot_id(proc: Path = PROC) -> str:
    """This boot's id (a new random UUID at every boot)."""
    try:
        return (proc / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None when there is no
    such process (or it is a zombie: it has exited)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ')':
    # the fields after it are split from the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        if fields[0] in ("Z", "X"):
            return None
        return int(fields[19])  # field 22 of the whole line; field 3 (state) is fields[0]
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start: int
    boot: str

    @classmethod
    def of(cls, pid: int, proc: Path = PROC) -> ProcessIdentity | None:
        """The identity of the running process ``pid`` (None when there is none)."""
        start = start_time(pid, proc)
        return None if start is None else cls(pid, start, boot_id(proc))

    def alive(self, proc: Path = PROC) -> bool:
        """Whether the process recorded is still the one running with this PID."""
        return self.why_not(proc) is None

    def why_not(self, proc: Path = PROC) -> str | None:
        """Why the process now at this PID is not the one recorded (None when it is)."""
        if self.boot != boot_id(proc):
            return "recorded before this machine last booted"
        now = start_time(self.pid, proc)
        if now is None:
            return "no longer running"
        if now != self.start:
            return f"PID {self.pid} now belongs to another process (started at tick {now}, not {self.start})"
        return None

    def to_json(self) -> dict:
        return {"pid": self.pid, "start": self.start, "boot": self.boot}

    @classmethod
    def from_json(cls, doc: object) -> ProcessIdentity | None:
        """A recorded identity, or None for a record without one (written by an older
        agent, or hand-edited): a PID without its start time is never trusted."""
        if not isinstance(doc, dict):
            return None
        pid, start, boot = doc.get("pid"), doc.get("start"), doc.get("boot")
        if not (isinstance(pid, int) and pid > 1 and isinstance(start, int) and isinstance(boot, str) and boot):
            return None
        return cls(pid, start, boot)
