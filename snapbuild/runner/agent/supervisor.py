"""The supervisor: one slot per configured server, a loop that decides what each slot
needs, and a worker thread per slot that does it.

The loop itself never waits on a registry, CRIU or runc: it looks at every slot a few
times a second and hands what is due (start, poll the tag, roll, clean up after a
death) to that slot's worker, one job at a time. A restore that hangs therefore holds
up its own slot only, until the tool's time limit (snapbuild.tools) ends it; the
others keep being watched and rolled, and ``/healthz`` keeps saying the loop runs.

A slot moves through :class:`State`::

    STARTING -> READY -> (died) RESTARTING -> READY ...
                      -> (died max_restarts times in restart_window_s) FAILED
    FAILED -> (its tag moves) RESTARTING;   any -> (SIGTERM) STOPPED
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ...errors import SnapbuildError
from ...runtime import process
from ...runtime.identity import ProcessIdentity
from ...store import Store
from ...store.fsutil import atomic_write_json
from .config import AgentConfig, ServerConfig
from .metrics import Metrics
from .proxy import Proxy, parse_address

#: Seconds the supervisor waits for busy workers at shutdown before it stops the servers.
SHUTDOWN_WAIT_S = 10


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class Slot:
    cfg: ServerConfig
    state: State = State.STARTING
    ident: ProcessIdentity | None = None  # the server's process: its pid, start time, boot
    container: str | None = None
    digest: str | None = None
    mode: str | None = None
    reason: str | None = None
    verify: str | None = None  # how the restored server answered the check requests (restore's "verify")
    address: str | None = None  # where the server is (a container's own host port)
    started_at: float | None = None
    restarts: int = 0
    restore_failures: int = 0
    deaths: deque = field(default_factory=deque)
    next_try: float = 0.0
    backoff: float = 0.0
    next_poll: float = 0.0
    last_error: str | None = None
    proxy: Proxy | None = None
    job: str | None = None  # what its worker is doing ("start", "poll", ...), None when idle
    job_since: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.ident.pid if self.ident else None

    @property
    def name(self) -> str:
        return self.cfg.name

    def view(self) -> dict:
        now = time.monotonic()
        return {"name": self.cfg.name, "ref": self.cfg.ref, "state": self.state.value, "digest": self.digest,
                "mode": self.mode, "reason": self.reason, "verify": self.verify, "pid": self.pid,
                "container": self.container,
                "address": self.address, "publish": self.cfg.publish, "restarts": self.restarts,
                "restore_failures": self.restore_failures, "last_error": self.last_error,
                "busy": {"job": self.job, "for_s": round(now - self.job_since, 1)} if self.job else None,
                "uptime_s": round(now - self.started_at, 1) if self.started_at else None}


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
        self.last_tick = time.monotonic()  # when the loop last ran (for /healthz)

    # --- logging and state ------------------------------------------------------------
    def log(self, event: str, **fields) -> None:
        self._log({"event": event, **fields})

    def save_state(self) -> None:
        with self._lock:
            data = {"servers": {
                n: {**s.ident.to_json(), "container": s.container, "digest": s.digest, "mode": s.mode,
                    "reason": s.reason, "verify": s.verify, "address": s.address}
                for n, s in self.slots.items() if s.ident}}
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_path, data)

    def loop_age(self) -> float:
        return time.monotonic() - self.last_tick

    def warn_if_unverified(self) -> None:
        """One line when some server's snapshots are taken without a trust policy."""
        from ...signing import UNVERIFIED_WARNING, node_policy

        open_servers = [s.name for s in self.config.servers if node_policy(s.trust_policy) is None]
        if open_servers:
            self.log("warning", message=UNVERIFIED_WARNING, servers=open_servers)

    def adopt(self) -> None:
        """After a crash of the agent: keep what it had started and is still alive and
        wanted, stop the rest. A record is believed only when the process at its PID
        has the start time and boot id recorded: after a reboot, or once the PID went
        to another process, nothing is adopted or signalled."""
        try:
            old = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return
        servers = old.get("servers") if isinstance(old, dict) else None
        for name, rec in (servers if isinstance(servers, dict) else {}).items():
            ident = ProcessIdentity.from_json(rec)
            why = "the record has no start time and boot id" if ident is None else ident.why_not()
            if ident is None or why:
                self.log("not_adopted", server=name, pid=rec.get("pid") if isinstance(rec, dict) else None,
                         reason=why)
                continue
            slot = self.slots.get(name)
            if slot is None:
                self._stop_process(rec.get("container"), ident)
                self.log("stopped_unwanted", server=name, pid=ident.pid)
                continue
            slot.ident, slot.container, slot.digest = ident, rec.get("container"), rec.get("digest")
            slot.mode, slot.address, slot.state = rec.get("mode"), rec.get("address"), State.READY
            slot.reason, slot.verify = rec.get("reason"), rec.get("verify")
            slot.started_at = time.monotonic()
            if slot.cfg.publish and slot.address:  # a container, or a host process in namespaces of its own
                slot.proxy = Proxy(slot.cfg.publish)
                slot.proxy.backend = parse_address(slot.address)
            self.metrics.up.labels(name).set(1)
            self.log("adopted", server=name, pid=ident.pid, digest=slot.digest)
        self.save_state()

    # --- starting and stopping --------------------------------------------------------
    def _run(self, slot: Slot, ref: str, mode: str) -> dict:
        from ..restore import run

        cfg = slot.cfg
        publish = "0" if cfg.publish else None  # a container gets a free port; the proxy fronts it
        return run(ref, registry=cfg.registry, mode=mode, store=self.store, publish=publish,
                   trust_policy=Path(cfg.trust_policy) if cfg.trust_policy else None,
                   cache_max=self.config.cache_max,
                   lazy_pages=cfg.lazy_pages)

    def _prefetch(self, cfg: ServerConfig, digest: str) -> None:
        from ...runtime.erofs import can_mount
        from ..pull import pull

        pull(f"{cfg.snapshot_name}@{digest}", registry=cfg.registry, store=self.store, images=can_mount(),
             trust_policy=Path(cfg.trust_policy) if cfg.trust_policy else None)

    def _resolve(self, cfg: ServerConfig) -> str:
        from ...registry import default_registry_url, open_registry, parse_ref

        reg = open_registry(cfg.registry or default_registry_url(self.store.home))
        return reg.resolve(parse_ref(cfg.ref))

    def start(self, slot: Slot, digest: str | None = None) -> dict | None:
        cfg = slot.cfg
        mode = "cold" if slot.restore_failures >= cfg.cold_after else "auto"
        ref = f"{cfg.snapshot_name}@{digest}" if digest else cfg.ref
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
                 verify=out.get("verify"), pid=out["pid"], timings=out["timings"])
        return out

    def _adopt_out(self, slot: Slot, out: dict) -> bool:
        """Make a started server the slot's; False (and the server stopped) when its
        node port cannot be served, or when the agent is shutting down meanwhile."""
        ident = ProcessIdentity.of(out["pid"]) if out.get("pid") else None
        if self._stop.is_set() or ident is None:
            self._stop_process(out.get("container"), ident)
            if ident is None:
                slot.last_error = f"the server (pid {out.get('pid')}) exited as soon as it was ready"
                self._back_off(slot)
            return False
        if slot.cfg.publish and out.get("address") and slot.proxy is None:
            try:
                slot.proxy = Proxy(slot.cfg.publish)
            except SnapbuildError as e:
                self._stop_process(out.get("container"), ident)
                slot.last_error = e.message
                self._back_off(slot)
                self.log("publish_failed", server=slot.cfg.name, port=slot.cfg.publish, error=e.message)
                return False
        with self._lock:
            slot.ident, slot.container, slot.digest = ident, out.get("container"), out["digest"]
            slot.mode, slot.reason, slot.address = out["mode"], out["reason"], out.get("address")
            slot.verify = out.get("verify")
            slot.state, slot.started_at, slot.last_error = State.READY, time.monotonic(), None
        if slot.proxy and slot.address:
            slot.proxy.backend = parse_address(slot.address)
        self.metrics.up.labels(slot.cfg.name).set(1)
        self.save_state()
        return True

    def _stop_process(self, container: str | None, ident: ProcessIdentity | None) -> None:
        """Stop a server this agent started: a container by its id (ours: a random name
        the agent recorded), a host process only while ``ident`` still names it."""
        from ..restore import stop

        target: int | str
        if container:
            target = container
        elif ident is not None and ident.alive():
            target = ident.pid
        else:
            return
        try:
            stop(target)
        except SnapbuildError as e:
            self.log("stop_failed", target=str(target), error=e.message)

    def _back_off(self, slot: Slot) -> None:
        cfg = slot.cfg
        slot.backoff = min(cfg.backoff_max_s, slot.backoff * 2 if slot.backoff else cfg.backoff_s)
        slot.next_try = time.monotonic() + slot.backoff
        slot.state = State.RESTARTING

    # --- the loop ---------------------------------------------------------------------
    def tick(self) -> None:
        """Look at every slot whose worker is idle and hand it what is due."""
        now = self.last_tick = time.monotonic()
        for slot in self.slots.values():
            if slot.job is None:
                due = self._due(slot, now)
                if due:
                    self._dispatch(slot, *due)

    def _due(self, slot: Slot, now: float) -> tuple[str, Callable[[], object]] | None:
        if slot.state == State.STOPPED:
            return None
        if slot.state == State.FAILED:
            if now >= slot.next_poll:  # a new version gets a new chance
                slot.next_poll = now + self.config.poll_s
                return "retry", lambda: self._retry_if_moved(slot)
            return None
        if slot.ident and not slot.ident.alive():
            return "died", lambda: self._died(slot, now)
        if slot.ident is None and now >= slot.next_try:
            return "start", lambda: self._start_slot(slot)
        if slot.ident and now >= slot.next_poll:
            slot.next_poll = now + self.config.poll_s
            return "poll", lambda: self.poll(slot)
        return None

    def _dispatch(self, slot: Slot, job: str, work: Callable[[], object]) -> None:
        slot.job, slot.job_since = job, time.monotonic()

        def run() -> None:
            try:
                work()
            except Exception as e:  # a bug must not end the slot's supervision
                slot.last_error = f"{job}: {type(e).__name__}: {e}"
                self.log("worker_error", server=slot.name, job=job, error=slot.last_error)
                self._back_off(slot)
            finally:
                slot.job = None

        threading.Thread(target=run, daemon=True, name=f"slot-{slot.name}-{job}").start()

    def _start_slot(self, slot: Slot) -> None:
        out = self.start(slot)
        if out and self._adopt_out(slot, out):
            slot.next_poll = time.monotonic() + self.config.poll_s

    def _died(self, slot: Slot, now: float) -> None:
        cfg = slot.cfg
        if slot.ident:
            process.reap([slot.ident.pid])
        self.log("server_died", server=cfg.name, pid=slot.pid, mode=slot.mode)
        self.metrics.crashes.labels(cfg.name).inc()
        self.metrics.up.labels(cfg.name).set(0)
        if slot.container:
            self._stop_process(slot.container, None)  # its forwarder, mounts, netns
        if slot.started_at and now - slot.started_at > cfg.backoff_max_s:
            slot.backoff = 0.0  # it ran well for a while: the next restart is quick again
        slot.deaths.append(now)
        while slot.deaths and now - slot.deaths[0] > cfg.restart_window_s:
            slot.deaths.popleft()
        with self._lock:
            slot.ident = slot.container = None
        slot.restarts += 1
        if len(slot.deaths) >= cfg.max_restarts:
            slot.state = State.FAILED
            slot.next_poll = now + self.config.poll_s
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
            slot.state, slot.next_try, slot.backoff, slot.restore_failures = State.RESTARTING, 0.0, 0.0, 0
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
        old_ident, old_container, old_address = slot.ident, slot.container, slot.address
        self.log("roll", server=cfg.name, old=slot.digest, new=digest)
        try:  # everything fetched (verified) first: a registry outage now leaves the old one serving
            self._prefetch(cfg, digest)
        except SnapbuildError as e:
            self.metrics.rolls.labels(cfg.name, "failed").inc()
            self.log("roll_failed", server=cfg.name, new=digest, error=e.message)
            return False
        # A container, or a host process in namespaces of its own behind the node port, runs
        # beside its successor until that one is ready; a plain host process holds its
        # port: it goes first.
        beside = bool(old_container or (old_address and slot.proxy))
        if not beside:
            self._stop_process(None, old_ident)
        out = self.start(slot, digest)
        if out is None:
            self.metrics.rolls.labels(cfg.name, "failed").inc()
            if beside:
                return False  # the old version keeps serving; the next poll tries again
            with self._lock:
                slot.ident = slot.container = None
            return False
        if not self._adopt_out(slot, out):
            return False
        if beside:
            old = parse_address(old_address)
            if slot.proxy and old:
                slot.proxy.drain(old)
            self._stop_process(old_container, None if old_container else old_ident)
        self.metrics.rolls.labels(cfg.name, "ok").inc()
        self.log("rolled", server=cfg.name, digest=digest, mode=out["mode"])
        return True

    def serve_forever(self, interval: float = 0.25) -> None:
        from .api import start_api

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        process.become_subreaper()  # restored servers are re-parented here, not to init
        self.warn_if_unverified()
        self.adopt()
        api = start_api(self)
        self.log("serving", servers=list(self.slots), api=self.config.api)
        try:
            while not self._stop.is_set():
                self.tick()
                self._stop.wait(interval)
        finally:
            self.shutdown()
            api.shutdown()

    def shutdown(self) -> None:
        """Stop every server. Workers get SHUTDOWN_WAIT_S to finish what they do (a
        server one of them starts after this is stopped by it: see _adopt_out)."""
        self._stop.set()
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        while time.monotonic() < deadline and any(s.job for s in self.slots.values()):
            time.sleep(0.05)
        for slot in self.slots.values():
            if slot.job:
                self.log("abandoned", server=slot.name, job=slot.job)
            if slot.ident:
                self._stop_process(slot.container, slot.ident)
                self.log("stopped", server=slot.cfg.name, pid=slot.pid)
            with self._lock:
                slot.ident = slot.container = None
                slot.state = State.STOPPED
            if slot.proxy:
                slot.proxy.close()
        self.save_state()


def _json_log(record: dict) -> None:
    import sys

    record = {"ts": round(time.time(), 3), **record}
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()
