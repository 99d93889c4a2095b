"""Start a server in namespaces of its own: PID, network (with ``lo`` up) and IPC.

    python -m snapbuild.runtime.nsinit -- ARGV...

This process moves into new network and IPC namespaces, brings ``lo`` up, and forks
the server as PID 1 of a new PID namespace, in a session of its own (CRIU dumps a
tree only when its session leader is inside its PID namespace). It then waits for the
server, passes SIGTERM and SIGINT on, and exits with its status. The server's PIDs,
port, abstract sockets and System V IPC are its own, so a node can restore one
snapshot side by side any number of times; the host reaches the port through a
forwarder into ``/proc/PID/ns/net`` (:mod:`.portfwd`).

Mounts, ``/dev/shm`` and paths are still the host's: a server that keeps files in
``/dev/shm`` or binds unix sockets to paths is refused by the checkpoint step.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys

CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: python -m snapbuild.runtime.nsinit -- ARGV...")
    try:
        unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID)
        loopback_up()
    except OSError as e:
        sys.exit(f"snapbuild nsinit: cannot make the server's namespaces: {e} (it needs root)")
    # A SIGTERM that comes while the server is being forked must reach it, not kill this
    # launcher and orphan it: both signals are held until the handlers are in place.
    held = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    pid = os.fork()
    if pid == 0:  # PID 1 of the new namespace
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
            os.setsid()
            os.execvp(args[0], args)
        except OSError as e:
            print(f"snapbuild nsinit: cannot start {args[0]!r}: {e.strerror}", file=sys.stderr)
        os._exit(127)
    done = False

    def forward(sig: int, _frame) -> None:
        if not done:  # once it is reaped, its PID may be another process's
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in held:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    _, status = os.waitpid(pid, 0)  # retried by Python when a signal interrupts it (PEP 475)
    done = True
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
