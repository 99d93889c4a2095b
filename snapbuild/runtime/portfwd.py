"""A TCP port of this machine forwarded into a container's network namespace.

Containers get a network namespace of their own (with only ``lo``), so two restores of
one snapshot can both listen on their port. This small process accepts on the host
port and, for each connection, connects to ``127.0.0.1:PORT`` *inside* the namespace:
it enters the namespace after creating its listening socket, and a socket belongs to
the namespace it was created in. No bridge, no routes, no iptables.

    python -m snapbuild.runtime.portfwd --fd N --netns /run/netns/NAME --port 8000

The listening socket is inherited as fd N, so the caller knows the port is taken
before this process runs (no race, and port 0 works).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import threading

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


def forward(client: socket.socket, address: tuple[str, int]) -> None:
    """Connect to ``address`` and copy both ways until both sides are done."""
    try:
        upstream = socket.create_connection(address, timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()  # the server is not (yet) listening: the client sees a reset, like a refused port
        return
    t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
    t.start()
    pipe(client, upstream)
    t.join()
    client.close()
    upstream.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    p.add_argument("--netns", required=True, help="path of the network namespace to connect into")
    p.add_argument("--port", type=int, required=True, help="port inside the namespace")
    a = p.parse_args(argv)
    listener = socket.socket(fileno=a.fd)
    enter_netns(a.netns)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=forward, args=(client, ("127.0.0.1", a.port)), daemon=True).start()


if __name__ == "__main__":
    main()
