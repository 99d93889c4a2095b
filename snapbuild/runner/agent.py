"""``snapbuild-runner serve``: a node agent that keeps a declared set of snapshots running.

The configuration (TOML) names the servers; for each, the agent restores the
snapshot (or boots it cold, with the reason), watches it, restarts it when it dies,
and rolls to a new digest when its tag moves::

    registry = "oci://registry.internal:5000/team"   # the default for every server
    trust_policy = "/etc/snapbuild/policy.json"       # optional
    cache_max = "200G"                               # optional: bound the node's store
    poll_s = 30                                      # how often tags are looked up again
    api = "127.0.0.1:9411"                           # or "unix:/run/snapbuild/agent.sock"
    state_dir = "/var/lib/snapbuild/agent"

    [[server]]
    name = "embedder"
    ref = "minilm-embedder:prod"
    publish = 8713          # containers only: the node port the agent serves it on

Restarts back off (``backoff_s`` doubling up to ``backoff_max_s``); after
``cold_after`` restores in a row that fell back or failed, the server is booted cold
directly; after ``max_restarts`` deaths within ``restart_window_s`` it is marked
``failed`` and left alone (never a tight loop) until the agent restarts or its tag
moves. A roll starts the new version, probes it ready, then stops the old one: for a
container the agent itself listens on ``publish`` and forwards each connection to the
current version, so the switch loses no connection; a host process listens on the
port it was built with, so the old one must stop first (a short gap).

The agent writes what it started to ``state_dir/agent.json`` after every change; when
it starts again (after a crash or SIGKILL) it adopts the servers recorded there that
are still alive and still wanted, and stops the others: no orphans, no doubles.
SIGTERM stops every server and exits.

The API (loopback HTTP or a unix socket): ``GET /servers`` (JSON), ``GET
/servers/NAME/log?lines=N``, ``GET /metrics`` (Prometheus), ``GET /healthz``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from ..errors import SnapbuildError, UsageError
from ..runtime import process
from ..runtime.portfwd import forward
from ..store import Store
from ..store.fsutil import atomic_write_json


@dataclass
class ServerConfig:
    name: str
    ref: str
    registry: str | None = None
    publish: int | None = None
    trust_policy: str | None = None
    cold_after: int = 3
    max_restarts: int = 5
    restart_window_s: float = 300
    backoff_s: float = 1
    backoff_max_s: float = 60


@dataclass
class AgentConfig:
    servers: list[ServerConfig]
    poll_s: float = 30
    api: str = "127.0.0.1:9411"
    state_dir: Path = Path("/var/lib/snapbuild/agent")
    cache_max: int | None = None  # bytes of the node's store (least recently used snapshots go)


SERVER_KEYS = set(ServerConfig.__dataclass_fields__)


def load_config(path: Path) -> AgentConfig:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read the agent configuration {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    defaults = {k: doc[k] for k in ("registry", "trust_policy") if k in doc}
    servers, seen = [], set()
    for i, s in enumerate(doc.get("server", [])):
        where = f"{path}: [[server]] number {i + 1}"
        unknown = set(s) - SERVER_KEYS
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                             hint=f"a server takes {', '.join(sorted(SERVER_KEYS))}")
        if "name" not in s or "ref" not in s:
            raise UsageError(f"{where}: `name` and `ref` are required")
        if s["name"] in seen:
            raise UsageError(f"{where}: a second server named {s['name']!r}")
        seen.add(s["name"])
        servers.append(ServerConfig(**{**defaults, **s}))
    if not servers:
        raise UsageError(f"{path} declares no [[server]]", hint='add [[server]] with name = "..." and ref = "NAME:TAG"')
    unknown = set(doc) - {"registry", "trust_policy", "poll_s", "api", "state_dir", "cache_max", "server"}
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    from .node_cache import parse_size

    return AgentConfig(servers=servers, poll_s=float(doc.get("poll_s", 30)), api=str(doc.get("api", "127.0.0.1:9411")),
                       state_dir=Path(doc.get("state_dir", "/var/lib/snapbuild/agent")),
                       cache_max=parse_size(doc["cache_max"]) if "cache_max" in doc else None)


def config_from_flags(servers: list[str], *, registry: str | None = None,
                      trust_policy: Path | None = None) -> AgentConfig:
    """``--server NAME=REF`` or ``NAME=REF:PORT`` (a container served on that node port)."""
    out = []
    for text in servers:
        name, eq, ref = text.partition("=")
        if not eq or not name or not ref:
            raise UsageError(f"--server {text!r}: expected NAME=REF or NAME=REF:PORT (e.g. web=app:prod)")
        publish = None
        head, _, last = ref.rpartition(":")
        if head and last.isdigit() and ":" in head:  # NAME:TAG:PORT
            ref, publish = head, int(last)
        out.append(ServerConfig(name=name, ref=ref, registry=registry,
                                trust_policy=str(trust_policy) if trust_policy else None, publish=publish))
    return AgentConfig(servers=out)


class Metrics:
    """The agent's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.starts = Counter("snapbuild_server_starts", "Servers started, by how", ["server", "mode"], registry=r)
        self.fallbacks = Counter("snapbuild_fallbacks", "Cold boots instead of a restore, by reason",
                                 ["server", "reason"], registry=r)
        self.crashes = Counter("snapbuild_server_crashes", "Servers found dead", ["server"], registry=r)
        self.rolls = Counter("snapbuild_rolls", "Rolls to a new digest", ["server", "result"], registry=r)
        self.errors = Counter("snapbuild_start_errors", "Starts that failed (registry down, ...)", ["server"],
                              registry=r)
        self.ready = Histogram("snapbuild_time_to_ready_seconds", "Seconds from start to ready, by phase",
                               ["mode", "phase"], registry=r,
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.bytes_fetched = Counter("snapbuild_bytes_fetched", "Bytes fetched from registries", registry=r)
        self.blobs = Counter("snapbuild_blob_lookups", "Blobs a start needed, by whether the node had them",
                             ["result"], registry=r)
        self.cache_bytes = Gauge("snapbuild_node_cache_bytes", "Bytes of blobs in the node's store", registry=r)
        self.up = Gauge("snapbuild_server_up", "1 when the server is running", ["server"], registry=r)

    def started(self, name: str, out: dict, fetched: dict | None) -> None:
        self.starts.labels(name, out["mode"]).inc()
        if out["mode"] == "cold" and out.get("reason"):
            self.fallbacks.labels(name, _reason_kind(out["reason"])).inc()
        for phase, seconds in out["timings"].items():
            if phase.endswith("_s"):
                self.ready.labels(out["mode"], phase[:-2]).observe(seconds)
        if fetched:
            self.bytes_fetched.inc(fetched.get("bytes_fetched", 0))
            self.blobs.labels("fetched").inc(fetched.get("blobs_fetched", 0))
            self.blobs.labels("cached").inc(max(0, fetched.get("blobs_total", 0) - fetched.get("blobs_fetched", 0)))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _reason_kind(reason: str) -> str:
    """A small set of label values for fallback reasons (the full text is in the logs)."""
    for prefix, kind in (("cold boot requested", "requested"), ("fingerprint mismatch", "fingerprint"),
                         ("restore failed", "restore_failed"), ("the restored server did not get ready", "not_ready"),
                         ("the GPU state", "gpu"), ("after_restore", "after_restore"), ("PID", "pid_taken"),
                         ("engine unusable", "engine")):
        if reason.startswith(prefix) or prefix in reason[:40]:
            return kind
    return "other"


@dataclass
class Slot:
    cfg: ServerConfig
    state: str = "starting"  # starting | ready | restarting | failed | stopped
    pid: int | None = None
    container: str | None = None
    digest: str | None = None
    mode: str | None = None
    reason: str | None = None
    address: str | None = None  # where the server is (a container's own host port)
    started_at: float | None = None
    restarts: int = 0
    restore_failures: int = 0
    deaths: deque = field(default_factory=deque)
    next_try: float = 0.0
    backoff: float = 0.0
    next_poll: float = 0.0
    last_error: str | None = None
    proxy: "Proxy | None" = None

    def view(self) -> dict:
        return {"name": self.cfg.name, "ref": self.cfg.ref, "state": self.state, "digest": self.digest,
                "mode": self.mode, "reason": self.reason, "pid": self.pid, "container": self.container,
                "address": self.address, "publish": self.cfg.publish, "restarts": self.restarts,
                "restore_failures": self.restore_failures, "last_error": self.last_error,
                "uptime_s": round(time.monotonic() - self.started_at, 1) if self.started_at else None}


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
        self.sock.close()


def _addr(address: str | None) -> tuple[str, int] | None:
    if not address:
        return None
    host, _, port = address.rpartition(":")
    return host, int(port)


class Agent:
    def __init__(self, config: AgentConfig, *, store: Store | None = None, log=None) -> None:
        self.config = config
        self.store = store or Store()
        self.slots = {s.name: Slot(cfg=s) for s in config.servers}
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._log = log or _json_log
        self.state_path = config.state_dir / "agent.json"

    # --- logging and state ------------------------------------------------------------
    def log(self, event: str, **fields) -> None:
        self._log({"event": event, **fields})

    def save_state(self) -> None:
        with self._lock:
            data = {"pid": os.getpid(), "servers": {
                n: {"pid": s.pid, "container": s.container, "digest": s.digest, "mode": s.mode,
                    "address": s.address} for n, s in self.slots.items() if s.pid}}
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_path, data)

    def adopt(self) -> None:
        """After a crash of the agent: keep what it had started and is still alive and
        wanted, stop the rest."""
        try:
            old = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return
        for name, rec in (old.get("servers") or {}).items():
            slot = self.slots.get(name)
            alive = rec.get("pid") and process.alive(rec["pid"])
            if slot is None or not alive:
                if alive:
                    self._stop_server(rec.get("container") or rec["pid"])
                    self.log("stopped_unwanted", server=name, pid=rec["pid"])
                continue
            slot.pid, slot.container, slot.digest = rec["pid"], rec.get("container"), rec.get("digest")
            slot.mode, slot.address, slot.state = rec.get("mode"), rec.get("address"), "ready"
            slot.started_at = time.monotonic()
            if slot.cfg.publish and slot.container:
                slot.proxy = Proxy(slot.cfg.publish)
                slot.proxy.backend = _addr(slot.address)
            self.metrics.up.labels(name).set(1)
            self.log("adopted", server=name, pid=slot.pid, digest=slot.digest)
        self.save_state()

    # --- starting and stopping --------------------------------------------------------
    def _run(self, slot: Slot, ref: str, mode: str) -> dict:
        from .restore import run

        cfg = slot.cfg
        publish = "0" if cfg.publish else None  # a container gets a free port; the proxy fronts it
        return run(ref, registry=cfg.registry, mode=mode, store=self.store, publish=publish,
                   trust_policy=Path(cfg.trust_policy) if cfg.trust_policy else None,
                   cache_max=self.config.cache_max)

    def _prefetch(self, cfg: ServerConfig, digest: str) -> None:
        from ..runtime.treeimages import can_mount
        from .pull import pull

        name = cfg.ref.partition(":")[0].partition("@")[0]
        pull(f"{name}@{digest}", registry=cfg.registry, store=self.store, images=can_mount(),
             trust_policy=Path(cfg.trust_policy) if cfg.trust_policy else None)

    def _resolve(self, cfg: ServerConfig) -> str:
        from ..registry import default_registry_url, open_registry, parse_ref

        reg = open_registry(cfg.registry or default_registry_url(self.store.home))
        return reg.resolve(parse_ref(cfg.ref))

    def start(self, slot: Slot, digest: str | None = None) -> dict | None:
        cfg = slot.cfg
        mode = "cold" if slot.restore_failures >= cfg.cold_after else "auto"
        name = cfg.ref.partition(":")[0].partition("@")[0]
        ref = f"{name}@{digest}" if digest else cfg.ref
        try:
            out = self._run(slot, ref, mode)
        except (SnapbuildError, OSError) as e:
            slot.last_error = e.message if isinstance(e, SnapbuildError) else f"{type(e).__name__}: {e}"
            self.metrics.errors.labels(cfg.name).inc()
            self._back_off(slot)
            self.log("start_failed", server=cfg.name, ref=ref, error=slot.last_error, retry_in_s=round(slot.backoff, 2))
            return None
        if mode == "auto" and out["mode"] == "cold":
            slot.restore_failures += 1
        elif out["mode"] == "restore":
            slot.restore_failures = 0
        self.metrics.started(cfg.name, out, out.get("fetch"))
        self.log("started", server=cfg.name, ref=ref, digest=out["digest"], mode=out["mode"], reason=out["reason"],
                 pid=out["pid"], timings=out["timings"])
        return out

    def _adopt_out(self, slot: Slot, out: dict) -> bool:
        """Make a started server the slot's; False (and the server stopped) when its
        node port cannot be served."""
        if slot.cfg.publish and out.get("container") and slot.proxy is None:
            try:
                slot.proxy = Proxy(slot.cfg.publish)
            except SnapbuildError as e:
                self._stop_server(out["container"])
                slot.last_error = e.message
                self._back_off(slot)
                self.log("publish_failed", server=slot.cfg.name, port=slot.cfg.publish, error=e.message)
                return False
        with self._lock:
            slot.pid, slot.container, slot.digest = out["pid"], out.get("container"), out["digest"]
            slot.mode, slot.reason, slot.address = out["mode"], out["reason"], out.get("address")
            slot.state, slot.started_at, slot.last_error = "ready", time.monotonic(), None
        if slot.proxy and slot.container:
            slot.proxy.backend = _addr(slot.address)
        self.metrics.up.labels(slot.cfg.name).set(1)
        self.save_state()
        return True

    def _stop_server(self, target) -> None:
        from .restore import stop

        try:
            stop(target)
        except SnapbuildError:
            pass

    def _back_off(self, slot: Slot) -> None:
        cfg = slot.cfg
        slot.backoff = min(cfg.backoff_max_s, slot.backoff * 2 if slot.backoff else cfg.backoff_s)
        slot.next_try = time.monotonic() + slot.backoff
        slot.state = "restarting"

    # --- the loop ---------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.state == "stopped":
                continue
            if slot.state == "failed":
                if now >= slot.next_poll:  # a new version gets a new chance
                    slot.next_poll = now + self.config.poll_s
                    self._retry_if_moved(slot)
                continue
            if slot.pid and not process.alive(slot.pid):
                self._died(slot, now)
                if slot.state == "failed":
                    slot.next_poll = now + self.config.poll_s
                    continue
            if slot.pid is None and now >= slot.next_try:
                out = self.start(slot)
                if out:
                    self._adopt_out(slot, out)
                    slot.next_poll = time.monotonic() + self.config.poll_s
            elif slot.pid and now >= slot.next_poll:
                slot.next_poll = now + self.config.poll_s
                self.poll(slot)

    def _died(self, slot: Slot, now: float) -> None:
        cfg = slot.cfg
        process.reap([slot.pid])
        self.log("server_died", server=cfg.name, pid=slot.pid, mode=slot.mode)
        self.metrics.crashes.labels(cfg.name).inc()
        self.metrics.up.labels(cfg.name).set(0)
        if slot.container:
            self._stop_server(slot.container)  # its forwarder, mounts, netns
        if slot.started_at and now - slot.started_at > cfg.backoff_max_s:
            slot.backoff = 0.0  # it ran well for a while: the next restart is quick again
        slot.deaths.append(now)
        while slot.deaths and now - slot.deaths[0] > cfg.restart_window_s:
            slot.deaths.popleft()
        slot.pid = slot.container = None
        slot.restarts += 1
        if len(slot.deaths) >= cfg.max_restarts:
            slot.state = "failed"
            slot.last_error = (f"died {len(slot.deaths)} times within {cfg.restart_window_s:g} s: not restarted "
                               "again until its tag moves or the agent restarts")
            self.log("server_failed", server=cfg.name, deaths=len(slot.deaths))
        else:
            self._back_off(slot)
        self.save_state()

    def _retry_if_moved(self, slot: Slot) -> None:
        try:
            digest = self._resolve(slot.cfg)
        except SnapbuildError:
            return
        if digest != slot.digest:
            self.log("retry_new_version", server=slot.cfg.name, digest=digest)
            slot.deaths.clear()
            slot.state, slot.next_try, slot.backoff, slot.restore_failures = "restarting", 0.0, 0.0, 0
            out = self.start(slot, digest)
            if out:
                self._adopt_out(slot, out)

    def poll(self, slot: Slot) -> None:
        """Roll when the tag names another digest now; a registry that does not answer
        leaves the running version alone."""
        try:
            digest = self._resolve(slot.cfg)
        except SnapbuildError as e:
            self.log("poll_failed", server=slot.cfg.name, error=e.message)
            return
        if digest != slot.digest:
            self.roll(slot, digest)

    def roll(self, slot: Slot, digest: str) -> bool:
        cfg = slot.cfg
        old = {"pid": slot.pid, "container": slot.container, "address": slot.address}
        self.log("roll", server=cfg.name, old=slot.digest, new=digest)
        try:  # everything fetched (verified) first: a registry outage now leaves the old one serving
            self._prefetch(cfg, digest)
        except SnapbuildError as e:
            self.metrics.rolls.labels(cfg.name, "failed").inc()
            self.log("roll_failed", server=cfg.name, new=digest, error=e.message)
            return False
        if not old["container"]:  # a host process holds its port: the old one goes first
            self._stop_server(old["pid"])
        out = self.start(slot, digest)
        if out is None:
            self.metrics.rolls.labels(cfg.name, "failed").inc()
            if old["container"]:
                return False  # the old version keeps serving; the next poll tries again
            slot.pid = slot.container = None
            return False
        if not self._adopt_out(slot, out):
            return False
        if old["container"]:
            if slot.proxy and _addr(old["address"]):
                slot.proxy.drain(_addr(old["address"]))
            self._stop_server(old["container"])
        self.metrics.rolls.labels(cfg.name, "ok").inc()
        self.log("rolled", server=cfg.name, digest=digest, mode=out["mode"])
        return True

    def serve_forever(self, interval: float = 0.25) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        process.become_subreaper()  # restored servers are re-parented here, not to init
        self.adopt()
        api = self.start_api()
        self.log("serving", servers=list(self.slots), api=self.config.api)
        try:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(interval)
        finally:
            self.shutdown()
            api.shutdown()

    def shutdown(self) -> None:
        for slot in self.slots.values():
            if slot.pid:
                self._stop_server(slot.container or slot.pid)
                self.log("stopped", server=slot.cfg.name, pid=slot.pid)
            slot.pid = slot.container = None
            slot.state = "stopped"
            if slot.proxy:
                slot.proxy.close()
        self.save_state()

    # --- the API ----------------------------------------------------------------------
    def start_api(self) -> ThreadingHTTPServer:
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if url.path == "/healthz":
                    return self._send(200, b'{"ok": true}')
                if url.path == "/metrics":
                    agent.metrics.cache_bytes.set(_store_bytes(agent.store))
                    return self._send(200, agent.metrics.text(), "text/plain; version=0.0.4")
                if url.path == "/servers":
                    with agent._lock:
                        body = [s.view() for s in agent.slots.values()]
                    return self._send(200, json.dumps({"servers": body}).encode())
                if len(parts) == 3 and parts[0] == "servers" and parts[2] == "log" and parts[1] in agent.slots:
                    lines = int(parse_qs(url.query).get("lines", ["100"])[0])
                    return self._send(200, _server_log(agent, agent.slots[parts[1]], lines).encode(), "text/plain")
                self._send(404, b'{"error": "not found"}')

        if self.config.api.startswith("unix:"):
            path = self.config.api[len("unix:"):]
            Path(path).unlink(missing_ok=True)

            class UnixServer(ThreadingHTTPServer):
                address_family = socket.AF_UNIX

                def server_bind(self):
                    self.socket.bind(self.server_address)

                def get_request(self):
                    conn, _ = self.socket.accept()
                    return conn, ("unix", 0)

            httpd = UnixServer(path, Handler)
            os.chmod(path, 0o660)
        else:
            host, _, port = self.config.api.rpartition(":")
            httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True, name="api").start()
        return httpd


def _server_log(agent: Agent, slot: Slot, lines: int) -> str:
    from .restore import server_log

    if not slot.digest:
        return ""
    name = slot.cfg.ref.partition(":")[0].partition("@")[0]
    try:
        return server_log(f"{name}@{slot.digest}", registry=slot.cfg.registry, lines=lines, store=agent.store)
    except SnapbuildError as e:
        return f"(no log: {e.message})\n"


def _store_bytes(store: Store) -> int:
    total = 0
    for d in store.blobs.digests():
        try:
            total += store.blobs.size(d)
        except OSError:
            pass
    return total


def _json_log(record: dict) -> None:
    import sys

    record = {"ts": round(time.time(), 3), **record}
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()
