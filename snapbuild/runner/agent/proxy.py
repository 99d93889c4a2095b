"""The node port of a container server, which a roll switches without losing a connection."""

from __future__ import annotations

import socket
import threading
import time

from ...errors import SnapbuildError
from ...runtime.portfwd import forward


class Proxy:
    """The node port of a container server: accepts there and forwards each connection
    to the current backend, which a roll switches at once (connections already open
    stay with the old one)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(("127.0.0.1", port))
        except OSError as e:
            self.sock.close()
            raise SnapbuildError(f"cannot listen on port {port}: {e.strerror}",
                                 hint="another process holds it; publish the server on another port") from None
        self.sock.listen(256)
        self.backend: tuple[str, int] | None = None
        self.active: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{port}").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            backend = self.backend
            if backend is None:
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client, backend), daemon=True).start()

    def _serve(self, client: socket.socket, backend: tuple[str, int]) -> None:
        with self._lock:
            self.active[backend] = self.active.get(backend, 0) + 1
        try:
            forward(client, backend)
        finally:
            self._done(backend)

    def _done(self, backend) -> None:
        with self._lock:
            self.active[backend] -= 1

    def drain(self, backend: tuple[str, int], timeout: float = 10) -> None:
        """Wait (a while) for the connections to an old backend to finish."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.active.get(backend, 0) > 0:
            time.sleep(0.05)

    def close(self) -> None:
        try:  # wakes the accepting thread, which holds the socket (and its port) until then
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def parse_address(address: str | None) -> tuple[str, int] | None:
    """``HOST:PORT`` as a socket address (None for None)."""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    return host, int(port)
