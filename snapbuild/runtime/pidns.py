"""Restore a host-process checkpoint in a PID namespace of its own.

    python -I -S snapbuild/runtime/pidns.py PIDFILE -- criu restore -d ... --pidfile PIDFILE

A host process's checkpoint brings its PIDs and thread IDs back, and on the machine's
own PID namespace any task that happens to hold one of them (a kernel worker thread
will do: a tree of vLLM has ~70 thread IDs, and a machine with ``pid_max`` 32768 wraps
its PIDs every few minutes) fails the restore ("Unable to create a thread: -17"). So,
as CRIU's own ``criu-ns`` does, the restore runs in a new PID namespace: the restored
tasks get their own numbers there, whatever the machine's are, and a mount namespace
of its own gives them a ``/proc`` that shows those numbers (all other mounts are the
machine's, as slaves: what the machine unmounts goes there too).

This launcher forks the namespace's PID 1, which runs the command (``criu restore
-d``) and, once it has detached the tree, stays as the tree's parent: it reaps what
the tree leaves and exits with the server's status when the server (the tree's root)
exits; the kernel then ends what is left of the namespace. The launcher exits with the
command's status, after writing the restored root's PID on this machine into PIDFILE
(where CRIU wrote the namespace's number).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_SLAVE = 0x2, 0x4, 0x8, 0x4000, 0x80000
LIBC = ctypes.CDLL(None, use_errno=True)


def command(pidfile: str, argv: list[str]) -> list[str]:
    """How to run ``argv`` (a ``criu restore -d`` writing ``pidfile``) in a PID namespace
    of its own: a bare interpreter (``-I -S``, ~30 ms) running this file."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), pidfile, "--", *argv]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def _children(pid: int) -> list[int]:
    """``pid``'s children, by this machine's PIDs (the keeper has one thread: its list is all)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _call(argv: list[str]) -> int:
    """Run ``argv`` and return its exit status (fork and exec: ``subprocess`` alone
    takes ~14 ms to import, on every restore's path)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            os.write(2, f"snapbuild pidns: cannot run {argv[0]}: {e.strerror}\n".encode())
        os._exit(127)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _ns_pid(pid: int) -> int | None:
    """``pid``'s number in the namespace this launcher made (the first below the
    machine's: a tree dumped with a namespace of its own gets one more, inside)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    levels = line.split()[1:]  # this /proc's namespace first, then each below it
                    return int(levels[1]) if len(levels) > 1 else None
    except (OSError, ValueError):
        pass
    return None


def init(pidfile: str, argv: list[str], report: int) -> None:
    """PID 1 of the namespace: a /proc of its own, the command, then the tree's reaper."""
    root = None
    try:
        _check(LIBC.unshare(CLONE_NEWNS), "unshare")  # its /proc: not the launcher's, which reads this machine's
        _check(LIBC.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
        _check(LIBC.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")
        rc = _call(argv)
        if rc == 0:
            root = _read_pid(pidfile)  # the namespace's number, before the launcher rewrites it
    except (OSError, ValueError, IndexError) as e:
        print(f"snapbuild pidns: {e}", file=sys.stderr)
        rc = 127
    os.write(report, f"{rc}\n".encode())
    os.close(report)
    if rc != 0:
        os._exit(rc)
    # The tree runs detached below this process: none of the caller's pipes stays open here.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.setsid()
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == root:  # its exit ends the namespace: the kernel kills what is left of it
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -I -S pidns.py PIDFILE -- COMMAND...", file=sys.stderr)
        return 2
    pidfile, cmd = argv[0], argv[2:]
    try:
        _check(LIBC.unshare(CLONE_NEWPID), "unshare")
    except OSError as e:
        print(f"snapbuild pidns: cannot make a PID namespace: {e} (it needs root)", file=sys.stderr)
        return 126
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        init(pidfile, cmd, w)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as said:
        told = said.read().strip()
    rc = int(told) if told.isdigit() else 1
    if rc != 0:
        os.waitpid(pid, 0)
        return rc
    ns_root = _read_pid(pidfile)
    found = [p for p in _children(pid) if _ns_pid(p) == ns_root]
    if not found:
        print(f"snapbuild pidns: the restored process ({ns_root} in its namespace) is gone", file=sys.stderr)
        return 1
    with open(pidfile, "w") as f:
        f.write(f"{found[0]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
