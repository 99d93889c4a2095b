"""A hostile OCI registry on 127.0.0.1: a threaded HTTP server that speaks enough of the
distribution API for a pull (manifests by tag or digest, blobs, HEAD and GET), serves
the blobs of a store honestly, and answers for the digests it is told to in one of
these ways:

    endless       200, no Content-Length, bytes until the client hangs up
    longer        the blob, then ENDLESS_BYTES more, no Content-Length
    gzip-bomb     Content-Encoding: gzip, a gzip stream of BOMB_BYTES zeros
    drip          the right headers, then one byte of the body every DRIP_S seconds
    drip-headers  the status line, then one byte of a header every DRIP_S seconds
    redirect      307 to the honest blob, with an endless body of its own

A test makes a snapshot (tests/integration/test_hostile.py's Forge), serves its store
with :func:`serve`, and points ``hostile[digest]`` at a mode. "Endless" is capped at
ENDLESS_BYTES, so that a client without bounds ends up with a memory peak a test can
see rather than the machine's OOM killer.
"""

from __future__ import annotations

import re
import threading
import zlib
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from snapbuild.store.blobs import BlobStore

ENDLESS_BYTES = 768 << 20
BOMB_BYTES = 1 << 30
DRIP_S = 3.0
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/?]+)")


@lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    """BOMB_BYTES zeros, gzip-compressed: about 1 MiB on the wire."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    zeros = bytes(1 << 20)
    return b"".join(c.compress(zeros) for _ in range(BOMB_BYTES >> 20)) + c.flush()


class HostileRegistry(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, blobs: BlobStore) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.blobs = blobs
        self.tags: dict[str, str] = {}  # "name:tag" -> manifest digest
        self.hostile: dict[str, str] = {}  # digest -> mode
        self.requests: list[str] = []
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"oci://127.0.0.1:{self.server_address[1]}/hostile"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up on a hostile answer is what the tests want

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HostileRegistry

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, *, head: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        if self.path.rstrip("/") == "/v2":
            return self._send(200, b"{}", "application/json", head)
        m = _PATH.match(self.path)
        if not m:
            return self._send(404, b"{}", "application/json", head)
        ref = m["ref"]
        name = m["name"].split("/", 1)[1] if "/" in m["name"] else m["name"]
        digest = ref if ref.startswith("sha256:") else self.server.tags.get(f"{name}:{ref}")
        if digest is None or not self.server.blobs.has(digest):
            return self._send(404, b'{"errors":[{"code":"NOT_FOUND","message":"no such thing"}]}',
                              "application/json", head)
        data = self.server.blobs.get(digest)
        kind = MANIFEST if m["kind"] == "manifests" else "application/octet-stream"
        mode = self.server.hostile.get(digest)
        if mode is None or head or "honest=1" in self.path:
            return self._send(200, data, kind, head, digest)
        getattr(self, "_" + mode.replace("-", "_"))(data, kind)

    def _send(self, code: int, data: bytes, kind: str, head: bool, digest: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if digest:
            self.send_header("Docker-Content-Digest", digest)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _close_delimited(self, kind: str, **headers: str) -> None:
        """Headers of an answer whose body ends when the connection does."""
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Connection", "close")
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.close_connection = True

    def _pour(self, first: bytes, total: int) -> None:
        """``first``, then zeros, ``total`` bytes in all (or until the client hangs up)."""
        chunk = bytes(1 << 20)
        sent = 0
        try:
            self.wfile.write(first)
            sent = len(first)
            while sent < total and not self.server.stopping.is_set():
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass

    def _endless(self, data: bytes, kind: str) -> None:
        self._close_delimited(kind)
        self._pour(b"", ENDLESS_BYTES)

    def _longer(self, data: bytes, kind: str) -> None:
        self._close_delimited(kind)
        self._pour(data, len(data) + ENDLESS_BYTES)

    def _redirect(self, data: bytes, kind: str) -> None:
        self.send_response(307)
        self.send_header("Location", self.path + "?honest=1")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._pour(b"", ENDLESS_BYTES)

    def _gzip_bomb(self, data: bytes, kind: str) -> None:
        bomb = gzip_bomb()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(bomb)))
        self.end_headers()
        try:
            self.wfile.write(bomb)
        except OSError:
            pass

    def _drip(self, data: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self._drip_out(data)

    def _drip_headers(self, data: bytes, kind: str) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self._drip_out(b"X-Slow: " + b"a" * 100_000)

    def _drip_out(self, data: bytes) -> None:
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                if self.server.stopping.wait(DRIP_S):
                    return
        except OSError:
            pass
        self.close_connection = True


def serve(blobs: BlobStore | Path) -> HostileRegistry:
    """Start a hostile registry over ``blobs`` (a store's BlobStore, or its folder)."""
    server = HostileRegistry(blobs if isinstance(blobs, BlobStore) else BlobStore(Path(blobs)))
    threading.Thread(target=server.serve_forever, name="hostile-registry", daemon=True).start()
    return server  # listening since it was made: a client's connection waits in the backlog
