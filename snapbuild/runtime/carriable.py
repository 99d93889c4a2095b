"""What CRIU cannot carry, found in a live process tree before the long wait of a dump.

A dump that meets an io_uring, a perf event, a BPF program or link, a userfaultfd, a
KVM machine, or a unix socket connected to a process outside the tree fails, and only
after it has frozen the tree and written most of its images: minutes for a big server,
with a message that names neither the process nor the descriptor. :func:`scan` reads
each process's ``/proc/PID/fd`` links (and, for unix sockets, their peers as
``ss -xaH`` reports them in the tree's network namespace) and names each of those
things by process, command line and fd number, so the checkpoint step can refuse the
tree right after the server is ready and again just before the dump.

What CRIU carries is left alone: inotify and fanotify, eventfd, signalfd, timerfd,
epoll, pidfd, memfd, BPF maps (some kinds), TCP connections (``--tcp-established``).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: ``anon_inode:NAME`` link targets CRIU refuses, with what they are and what to change.
ANON = {
    "[io_uring]": ("an io_uring instance", "io_uring"),
    "[perf_event]": ("a perf event", "perf"),
    "bpf-prog": ("a BPF program", "bpf"),
    "bpf_link": ("a BPF link", "bpf"),
    "[userfaultfd]": ("a userfaultfd", "userfaultfd"),
    "kvm-vm": ("a KVM virtual machine", "kvm"),
    "kvm-vcpu": ("a KVM virtual CPU", "kvm"),
}
PEER = "peer"
HINTS = {
    "io_uring": "the server starts with io_uring denied (seccomp), so this one came from outside the filter (passed "
                "over a socket, or a runtime that ignores the profile): make the server create it after the restore "
                "(an `after_restore:` call), or use epoll",
    "perf": "start profilers and perf counters after the restore, not during the warm-up",
    "bpf": "load BPF programs after the restore (an `after_restore:` call), or outside the server",
    "userfaultfd": "use userfaultfd only after the restore",
    "kvm": "a virtual machine cannot be checkpointed by CRIU: start it after the restore",
    PEER: "open connections to processes outside the server (a log daemon, a sidecar, a parent shell) only after "
          "the restore (an `after_restore:` call can make the server reconnect), or start the peer inside the "
          "server's process tree",
}
#: io_uring's tip when the warm-up opted out of the deny (runtime.seccomp).
IO_URING_ALLOWED = ("io_uring is denied by default (as Docker does), and libuv/uvloop then use epoll; this warm-up "
                    "opted out with `io_uring: allow`: remove that line")


@dataclass(frozen=True)
class Uncarriable:
    """One descriptor of the tree that CRIU cannot dump."""

    pid: int
    command: str
    fd: int
    target: str  # the fd's link, e.g. ``anon_inode:[io_uring]``
    what: str  # in words
    kind: str  # a key of HINTS

    def describe(self) -> str:
        return f"process {self.pid} ({self.command}) holds {self.what} on fd {self.fd} ({self.target})"


def classify(target: str) -> tuple[str, str] | None:
    """(what, kind) when a descriptor linking to ``target`` cannot be dumped, else None."""
    if target.startswith("anon_inode:"):
        return ANON.get(target[len("anon_inode:"):])
    return None


def scan(pids: list[int], *, proc: Path = Path("/proc"), peers=None) -> list[Uncarriable]:
    """What the processes ``pids`` (a whole tree) hold that CRIU cannot carry, in order
    of pid and fd. ``peers``: ``{socket inode: peer inode}`` of connected unix sockets
    (default: :func:`unix_peers` of the tree's network namespaces); ``proc``: where
    /proc is (a fake one in tests)."""
    held = {pid: _fds(proc, pid) for pid in pids}
    out = []
    for pid in sorted(held):
        for fd, target in held[pid]:
            found = classify(target)
            if found:
                out.append(Uncarriable(pid, _command(proc, pid), fd, target, *found))
    sockets = {ino: (pid, fd, t) for pid in held for fd, t in held[pid] if (ino := _inode(t))}
    if sockets:
        links = unix_peers(pids, proc) if peers is None else peers
        for ino, (pid, fd, target) in sorted(sockets.items(), key=lambda kv: kv[1][:2]):
            peer = links.get(ino)
            if peer and peer not in sockets:
                holder = _holder(proc, peer, set(pids))
                if holder is not None:
                    out.append(Uncarriable(pid, _command(proc, pid), fd, target,
                                           "a unix socket connected to a process outside its tree "
                                           f"(pid {holder}: {_command(proc, holder)})", PEER))
    return out


def unix_peers(pids: list[int], proc: Path = Path("/proc")) -> dict[int, int]:
    """``{inode: peer inode}`` of the connected unix sockets in the network namespaces
    of ``pids`` (``ss`` reports a namespace's own; one entered per namespace)."""
    spaces: dict[str, int] = {}
    for pid in pids:
        try:
            spaces.setdefault(os.readlink(proc / str(pid) / "ns" / "net"), pid)
        except OSError:
            continue
    try:
        own = os.readlink("/proc/self/ns/net")
    except OSError:
        own = ""
    out: dict[int, int] = {}
    for ns, pid in spaces.items():
        argv = ["ss", "-xaH"] if ns == own else ["nsenter", f"--net={proc}/{pid}/ns/net", "ss", "-xaH"]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue  # no ss (iproute2): CRIU itself will say it, later
        out.update(parse_ss(r.stdout))
    return out


def parse_ss(text: str) -> dict[int, int]:
    """``{inode: peer inode}`` from ``ss -xaH`` lines (``u_str ESTAB 0 0 ADDR INODE
    PEER PEER_INODE``; the addresses may be ``*``); unconnected sockets left out."""
    out = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[-3].isdigit() and cols[-1].isdigit() and cols[-1] != "0":
            out[int(cols[-3])] = int(cols[-1])
    return out


def _fds(proc: Path, pid: int) -> list[tuple[int, str]]:
    try:
        names = os.listdir(proc / str(pid) / "fd")
    except OSError:
        return []
    out = []
    for name in sorted(names, key=lambda n: int(n) if n.isdigit() else -1):
        try:
            out.append((int(name), os.readlink(proc / str(pid) / "fd" / name)))
        except (OSError, ValueError):
            continue  # closed while being read
    return out


def _inode(target: str) -> int | None:
    return int(target[8:-1]) if target.startswith("socket:[") and target[8:-1].isdigit() else None


def _holder(proc: Path, inode: int, inside: set[int]) -> int | None:
    """A process outside ``inside`` that holds socket ``inode``, or None (the peer is
    gone, or its holder cannot be seen from here)."""
    want = f"socket:[{inode}]"
    for entry in os.listdir(proc):
        if entry.isdigit() and int(entry) not in inside:
            if any(t == want for _, t in _fds(proc, int(entry))):
                return int(entry)
    return None


def _command(proc: Path, pid: int) -> str:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"
    return text if len(text) <= 240 else f"{text[:80]} ... {text[-150:]}"  # the script and its options at the end
