"""Starting and stopping server processes so that CRIU can dump and restore them.

The server runs as the leader of its own session (``setsid``) with stdin from
/dev/null and stdout+stderr appended to a log file at a fixed path under the run
root: CRIU restores that file by path, so the runner recreates it at the same place
and the restored server keeps logging there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from .identity import start_time

def start(argv: list[str], *, env: dict, cwd: Path, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # append mode: restores survive a grown log
        return subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)


def alive(pid: int) -> bool:
    """Whether some process (not a zombie) holds ``pid``: see identity for whether it is
    the one you mean."""
    return start_time(pid) is not None


def pid_gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Wait until no process holds these PIDs (a killed process lingers until reaped:
    those that are our children, adopted ones included, are reaped here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap(pids)
        if all(pid_gone(p) for p in pids):
            return True
        time.sleep(0.02)
    return all(pid_gone(p) for p in pids)


def stop(pid: int, *, timeout: float = 10.0) -> bool:
    """Stop a server and everything in its session: SIGTERM, then SIGKILL. True if it was running."""
    if pid_gone(pid):
        return False
    sid = _sid(pid)
    targets = _session_members(sid) if sid == pid else [pid]
    keeper = _ppid(pid)  # a restored server's: the PID 1 of its namespace (runtime.pidns)
    for p in targets:
        _signal(p, signal.SIGTERM)
    if _ignores_sigterm(pid):  # the kernel drops it: no use waiting
        timeout = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        reap(targets)
        time.sleep(0.05)
    for p in targets:
        _signal(p, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(pid_gone(p) for p in targets):
        reap(targets)  # the PIDs are free once the exit is collected, by us or by init
        time.sleep(0.01)
    if keeper > 1 and _ppid(keeper) == os.getpid() and _status(keeper).get("NSpid", "").split()[-1:] == ["1"]:
        wait_gone([keeper], timeout=5)  # our child (a subreaper's): it exits with its server, collected here
    return True


def _ignores_sigterm(pid: int) -> bool:
    """Whether ``pid`` is PID 1 of a PID namespace (a server in namespaces of its own)
    with no handler for SIGTERM: the kernel discards signals such an init does not
    catch, so only SIGKILL (from outside the namespace) stops it."""
    fields = _status(pid)
    nspid = fields.get("NSpid", "").split()
    if len(nspid) < 2 or nspid[-1] != "1":
        return False
    caught = int(fields.get("SigCgt", "0").strip() or "0", 16)
    return not caught & (1 << (signal.SIGTERM - 1))


def _status(pid: int) -> dict[str, str]:
    try:
        return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if ":" in line)
    except OSError:
        return {}


def ns_pid(pid: int) -> int | None:
    """The PID that ``pid`` has in its own (innermost) PID namespace: itself on the
    host, its container's or namespace's number inside one; None when it is gone."""
    nspid = _status(pid).get("NSpid", "").split()
    return int(nspid[-1]) if nspid else None


def host_pids(root: int, ns_pids: list[int]) -> list[int]:
    """This machine's PIDs of the processes in ``root``'s tree whose namespace PIDs
    are ``ns_pids`` (in that order); a number no process of the tree has is left out."""
    by_ns = {ns_pid(p): p for p in tree(root)}
    return [by_ns[n] for n in ns_pids if n in by_ns]


def mapped(pid: int, prefix: str) -> list[tuple[str, int, int]]:
    """(path, st_dev, st_ino) of each file mapping of ``pid`` whose path starts with
    ``prefix`` (one line of /proc/PID/maps each); a gone process has none."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(prefix):
            major, _, minor = parts[3].partition(":")
            out.append((parts[5], os.makedev(int(major, 16), int(minor, 16)), int(parts[4])))
    return out


def fds(pid: int) -> list[tuple[str, str]]:
    """(its path under /proc, what it links to) for each open file descriptor of ``pid``;
    those that close while being read are left out, and a gone process has none."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in names:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            out.append((path, os.readlink(path)))
        except OSError:
            continue
    return out


def users_in_other_mount_namespaces(path: str | Path) -> list[int]:
    """The processes of another mount namespace than this one's that map, hold open or
    work in a file below ``path`` (by the same path: a restored host server's namespace
    is a copy of this one, runtime.pidns). There an unmount of ``path`` here does not
    fail while they use it: it is their copy that they use."""
    prefix = str(path).rstrip("/") + "/"
    try:
        mine = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return []
    found = []
    for pid in all_pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") == mine:
                continue
            cwd = os.readlink(f"/proc/{pid}/cwd") + "/"
        except OSError:
            continue
        if cwd.startswith(prefix) or mapped(pid, prefix) or any(t.startswith(prefix) for _, t in fds(pid)):
            found.append(pid)
    return found


def all_pids() -> list[int]:
    """Every process of this PID namespace but this one."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid()]


def escaped_holders(pids: list[int]) -> list[tuple[int, str]]:
    """Processes outside ``pids`` that hold one of their sockets itself (inherited or
    passed, not a peer): ``(pid, "socket:[INODE]")``, one per process. Such a process
    escaped the tree (a daemon that double-forked, setsid): a checkpoint leaves it out,
    and it keeps the socket, a listening port say, on this machine after the dump."""
    sockets = {t for p in pids for _, t in fds(p) if t.startswith("socket:[")}
    inside = set(pids)
    out = []
    for p in all_pids() if sockets else []:
        if p not in inside:
            held = next((t for _, t in fds(p) if t in sockets), None)
            if held and not _descends(p, inside):  # a child forked since ``pids`` was listed is no escape
                out.append((p, held))
    return out


def _descends(pid: int, ancestors: set[int]) -> bool:
    """Whether one of ``pid``'s ancestors now is in ``ancestors``."""
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        pid = _ppid(pid)
        if pid in ancestors:
            return True
    return False


def _ppid(pid: int) -> int:
    """``pid``'s parent (0 for the kernel's), -1 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def socket_name(target: str) -> str:
    """``socket:[INODE]`` in words: ``TCP 127.0.0.1:8000 (listening)`` when it is an
    IPv4 or IPv6 TCP socket of this network namespace, else the target itself."""
    inode = target[len("socket:["):-1]
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[9] == inode:
                host, _, port = cols[1].partition(":")
                raw = bytes.fromhex(host)
                if len(raw) == 4:
                    addr = ".".join(str(b) for b in reversed(raw))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    addr = "[" + ":".join(words[i:i + 2].hex() for i in range(0, 16, 2)) + "]"
                return f"TCP {addr}:{int(port, 16)}" + (" (listening)" if cols[3] == "0A" else "")
    return target


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return "?"


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (ppid := _ppid(int(entry))) >= 0:
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


def _session_members(sid: int | None) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return out or ([sid] if sid else [])


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(pids: list[int]) -> None:
    """Collect the exit status of those that are our children (else init does)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def reap_namespace_inits() -> None:
    """Collect this process's children that are exited PID 1s of a namespace: the
    keepers of restored servers (runtime.pidns) and containers' inits, which a
    subreaper (the agent) adopts; no ``Popen`` of ours waits for them."""
    children = []
    for task in Path("/proc/self/task").glob("*"):  # a child belongs to the thread that has it
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    for child in map(int, children):
        fields = _status(child)
        if fields.get("State", "").split()[:1] == ["Z"] and fields.get("NSpid", "").split()[-1:] == ["1"]:
            reap([child])


def first_child(pid: int, *, alive, timeout: float = 10.0) -> int:
    """The first child of ``pid`` once it has one (a launcher's server)."""
    from ..errors import SnapbuildError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        if not alive():
            break
        time.sleep(0.005)
    raise SnapbuildError(f"the server's launcher (pid {pid}) started no server")


def become_subreaper() -> bool:
    """Adopt orphaned descendants (``PR_SET_CHILD_SUBREAPER``): a restored server, whose
    parent ``criu restore -d`` exits, becomes our child, so :func:`stop` frees its PID at
    once instead of waiting for init to collect it (slow under some inits). For
    long-running callers that start and stop many servers, such as ``bench``."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def memory(pids: list[int]) -> dict:
    """Resident memory of these processes, split into anonymous (what a checkpoint must
    hold) and file-backed (left out when the file is unchanged), in bytes."""
    total = {"rss": 0, "anonymous": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Rss", "Anonymous"):
                        total[key.lower() if key == "Rss" else "anonymous"] += int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return {"rss_bytes": total["rss"], "anonymous_bytes": total["anonymous"],
            "file_backed_bytes": max(0, total["rss"] - total["anonymous"])}


def tail(path: Path, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""
