"""A TCP port of this machine forwarded into a container's network namespace.

Containers get a network namespace of their own (with only ``lo``), so two restores of
one snapshot can both listen on their port. This small process accepts on the host
port and, for each connection, connects to ``127.0.0.1:PORT`` *inside* the namespace:
it enters the namespace after creating its listening socket, and a socket belongs to
the namespace it was created in. No bridge, no routes, no iptables.

    python -m snapbuild.runtime.portfwd --fd N --netns /run/netns/NAME --port 8000 [--watch PID]

The listening socket is inherited as fd N, so the caller knows the port is taken
before this process runs (no race, and port 0 works). With ``--watch PID`` it exits
when that process does (a host process in namespaces of its own, whose network
namespace is ``/proc/PID/ns/net``): stopping the server stops its forwarder.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import socket
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000


def enter_netns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until EOF, then pass the EOF on (half-close), both ways safe."""
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


#: How long one connection attempt to the server waits for its answer, and how long
#: the attempts go on. While CRIU restores a container it drops the namespace's packets
#: (its network lock), and a dropped SYN is sent again only after a second: a client
#: that connects during a restore would wait that second after the server is back.
CONNECT_TRY_S = 0.05
CONNECT_FOR_S = 10.0


def connect(address: tuple[str, int]) -> socket.socket:
    """A connection to ``address``, tried again every ``CONNECT_TRY_S`` while attempts
    go unanswered (up to ``CONNECT_FOR_S``); a refusal is final at once."""
    deadline = time.monotonic() + CONNECT_FOR_S
    while True:
        try:
            upstream = socket.create_connection(address, timeout=CONNECT_TRY_S)
            upstream.settimeout(None)
            return upstream
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise


def forward(client: socket.socket, address: tuple[str, int]) -> None:
    """Connect to ``address`` and copy both ways until both sides are done."""
    try:
        upstream = connect(address)
    except OSError:
        client.close()  # the server is not (yet) listening: the client sees a reset, like a refused port
        return
    t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
    t.start()
    pipe(client, upstream)
    t.join()
    client.close()
    upstream.close()


def listen(host_port: int, host: str = "127.0.0.1") -> socket.socket:
    """The host side's listening socket (port 0: a free one); a taken port is an error."""
    from ..errors import UsageError

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, host_port))
    except OSError as e:
        listener.close()
        raise UsageError(f"host port {host_port} on {host} is already taken ({e.strerror})",
                         hint="publish on another port: --publish PORT (0 picks a free one)") from None
    listener.listen(128)
    return listener


def spawn(listener: socket.socket, netns: str, port: int, watch: int | None = None) -> tuple[int, int]:
    """Start a forwarder on ``listener`` into ``netns``; returns (its pid, the host port).
    The listener is the forwarder's from then on (closed here)."""
    argv = [sys.executable, "-m", "snapbuild.runtime.portfwd", "--fd", str(listener.fileno()),
            "--netns", netns, "--port", str(port)]
    if watch is not None:
        argv += ["--watch", str(watch)]
    proc = subprocess.Popen(argv, pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    host_port = listener.getsockname()[1]
    listener.close()
    return proc.pid, host_port


def _exit_with(pid: int) -> None:
    """Exit this process once ``pid`` has."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        os._exit(0)  # gone already
    select.select([fd], [], [])
    os._exit(0)


def _poll_exit_with(pid: int) -> None:  # where pidfd_open is missing (kernels before 5.3)
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0.2)
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    p.add_argument("--netns", required=True, help="path of the network namespace to connect into")
    p.add_argument("--port", type=int, required=True, help="port inside the namespace")
    p.add_argument("--watch", type=int, help="exit when this process exits")
    a = p.parse_args(argv)
    listener = socket.socket(fileno=a.fd)
    enter_netns(a.netns)
    if a.watch:
        watcher = _exit_with if hasattr(os, "pidfd_open") else _poll_exit_with
        threading.Thread(target=watcher, args=(a.watch,), daemon=True).start()
    while True:
        client, _ = listener.accept()
        threading.Thread(target=forward, args=(client, ("127.0.0.1", a.port)), daemon=True).start()


if __name__ == "__main__":
    main()
