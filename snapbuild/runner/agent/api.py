"""The agent's HTTP API, on loopback or a unix socket (the agent warns at start when it
listens anywhere else: :func:`exposure_warning`).

``GET /servers`` (JSON), ``GET /servers/NAME/log?lines=N`` (text), ``GET /metrics``
(Prometheus), ``GET /healthz`` (200 while the supervisor loop runs, 503 once it has not
run for ``stale_after_s``: what the DaemonSet's liveness probe asks). Bad input gets a
4xx with a JSON error, and a failure inside a handler a 500 with one: never a
traceback.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

from ...errors import SnapbuildError

if TYPE_CHECKING:
    from .supervisor import Agent, Slot

MAX_LOG_LINES = 100_000


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Handler(BaseHTTPRequestHandler):
    agent: Agent  # set on the subclass that start_api makes

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, json.dumps(doc).encode())

    def do_GET(self) -> None:
        try:
            self._get(urlparse(self.path))
        except _ApiError as e:
            self._json(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - an API answers, it does not print tracebacks
            self.agent.log("api_error", path=self.path, error=f"{type(e).__name__}: {e}")
            self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def _get(self, url) -> None:
        agent = self.agent
        parts = url.path.strip("/").split("/")
        if url.path == "/healthz":
            age, bound = agent.loop_age(), agent.config.stale_after_s
            if age > bound:
                return self._json(503, {"ok": False, "loop_age_s": round(age, 1), "error":
                                        f"the supervisor loop has not run for {age:.0f} s (bound {bound:g} s)"})
            return self._json(200, {"ok": True, "loop_age_s": round(age, 1)})
        if url.path == "/metrics":
            agent.metrics.cache_bytes.set(_store_bytes(agent))
            agent.metrics.loop_age.set(agent.loop_age())
            return self._send(200, agent.metrics.text(), "text/plain; version=0.0.4")
        if url.path == "/servers":
            with agent._lock:
                body = [s.view() for s in agent.slots.values()]
            return self._json(200, {"servers": body})
        if len(parts) == 3 and parts[0] == "servers" and parts[2] == "log":
            slot = agent.slots.get(parts[1])
            if slot is None:
                raise _ApiError(404, f"no server named {parts[1]!r} (GET /servers lists them)")
            text = parse_qs(url.query).get("lines", ["100"])[0]
            if not text.isdigit() or not 0 < int(text) <= MAX_LOG_LINES:
                raise _ApiError(400, f"lines must be a whole number from 1 to {MAX_LOG_LINES}, not {text!r}")
            return self._send(200, _server_log(agent, slot, int(text)).encode(), "text/plain")
        raise _ApiError(404, f"no such endpoint {url.path} (GET /servers, /servers/NAME/log, /metrics, /healthz)")


class _UnixServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        self.socket.bind(self.server_address)

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def start_api(agent: Agent) -> ThreadingHTTPServer:
    """Serve the API of ``agent`` at ``agent.config.api`` in a thread of its own."""
    handler = type("AgentHandler", (Handler,), {"agent": agent})
    address = agent.config.api
    httpd: ThreadingHTTPServer
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        Path(path).unlink(missing_ok=True)
        httpd = _UnixServer(path, handler)  # type: ignore[arg-type]
        os.chmod(path, 0o660)
    else:
        host, _, port = address.rpartition(":")
        httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True, name="api").start()
    return httpd


def exposure_warning(address: str) -> str | None:
    """What to tell the operator when the API at ``address`` is reachable from beyond this
    machine (None on loopback or a unix socket): it has no authentication."""
    if address.startswith("unix:"):
        return None
    host = address.rpartition(":")[0].strip("[]") or "127.0.0.1"
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: it may resolve to anything
    port = address.rpartition(":")[2]
    return (f"the agent's API listens on {address}, beyond loopback, without authentication: whoever reaches "
            f"this node on port {port} can read /servers (snapshots, digests, PIDs, errors), /metrics and "
            f"every server's log (which may hold secrets); bind it to 127.0.0.1 (api = \"127.0.0.1:{port}\" "
            "or --api 127.0.0.1:PORT) or a unix socket, and let a proxy or the node's firewall decide who reaches it")


def _server_log(agent: Agent, slot: Slot, lines: int) -> str:
    from ..restore import server_log

    if not slot.digest:
        return ""
    try:
        return server_log(f"{slot.cfg.snapshot_name}@{slot.digest}", registry=slot.cfg.registry, lines=lines, store=agent.store)
    except SnapbuildError as e:
        return f"(no log: {e.message})\n"


def _store_bytes(agent: Agent) -> int:
    blobs, total = agent.store.blobs, 0
    for d in blobs.digests():
        try:
            total += blobs.size(d)
        except OSError:
            pass
    return total
