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
    STARTING, RESTARTING -> (the snapshot is refused: corrupt, hostile, untrusted) REFUSED
    REFUSED -> (its tag moves, or its back-off ends) RESTARTING
    STARTING, RESTARTING -> (too few free GPUs for its ``gpus``) WAITING -> (they are free) ...

GPUs (a server's ``gpus = N``) are given out in the loop itself, just before its start
is handed to the worker, so two starts never get the same GPU; they are given back
when the server stops, dies or fails to start (:mod:`.gpus` holds the rules).
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
from typing import Any

from ...errors import SnapbuildError
from ...runtime import process
from ...runtime.identity import ProcessIdentity
from ...store import Store
from ...store.fsutil import atomic_write_json
from .config import AgentConfig, ServerConfig
from .gpus import GpuPool
from .metrics import Metrics
from .proxy import Proxy, parse_address

#: Seconds the supervisor waits for busy workers at shutdown before it stops the servers.
SHUTDOWN_WAIT_S = 10
#: A rolling server's successor holds its own GPUs under this name until the roll is done.
NEXT = " (next version)"
#: A snapshot refused as corrupt, hostile or untrusted is tried again after this many
#: seconds, doubling up to the most, or as soon as its tag names another digest: checking
#: a hostile tree costs a pull, and a crash-loop back-off would repeat it every minute.
REFUSED_BACKOFF_S = 60
REFUSED_BACKOFF_MAX_S = 3600


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"
    WAITING = "waiting"  # for free GPUs (last_error says which and who holds them)
    REFUSED = "refused"  # its snapshot was refused (``refused`` says which and why): backing off


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
    gpus: list[dict] = field(default_factory=list)  # what it holds: [{"index", "uuid"}]
    last_gpus: list[int] = field(default_factory=list)  # the indexes it had: a restart takes them again if free
    #: the last snapshot refused: {"digest", "reason", "backoff_s", "until" (monotonic)}
    refused: dict | None = None

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
                "gpus": [dict(g) for g in self.gpus],
                "busy": {"job": self.job, "for_s": round(now - self.job_since, 1)} if self.job else None,
                "refused": {"digest": self.refused["digest"], "reason": self.refused["reason"],
                            "retry_in_s": round(max(0.0, self.refused["until"] - now), 1)} if self.refused else None,
                "uptime_s": round(now - self.started_at, 1) if self.started_at else None}


class Agent:
    def __init__(self, config: AgentConfig, *, store: Store | None = None, log=None,
                 gpus: list[str] | None = None) -> None:
        """``gpus``: the node's GPU UUIDs in index order; None: what nvidia-smi says now."""
        self.config = config
        self.store = store or Store()
        self.slots = {s.name: Slot(cfg=s) for s in config.servers}
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._log = log or _json_log
        self.gpus = GpuPool(self._node_gpus() if gpus is None else gpus)
        self._gpus_changed()
        self.state_path = config.state_dir / "agent.json"
        self.last_tick = time.monotonic()  # when the loop last ran (for /healthz)

    # --- logging and state ------------------------------------------------------------
    def log(self, event: str, **fields) -> None:
        self._log({"event": event, **fields})

    def _node_gpus(self) -> list[str]:
        from ...gpu.fingerprint import node_gpus

        try:
            fp = node_gpus()
        except ValueError as e:  # nvidia-smi said something unexpected
            self.log("warning", message=f"the node's GPUs are unknown: {e}; no server gets one")
            return []
        return list(fp["uuids"]) if fp else []

    def save_state(self) -> None:
        with self._lock:
            data = {"servers": {
                n: {**s.ident.to_json(), "container": s.container, "digest": s.digest, "mode": s.mode,
                    "reason": s.reason, "verify": s.verify, "address": s.address,
                    "gpus": [g["uuid"] for g in s.gpus]}
                for n, s in self.slots.items() if s.ident}}
            # written under the lock too: two workers saving at once must not let the older
            # picture land last (a server missing from it would not be adopted after a crash)
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
            self._adopt_gpus(slot, rec.get("gpus"))
            if slot.cfg.publish and slot.address:  # a container, or a host process in namespaces of its own
                slot.proxy = Proxy(slot.cfg.publish)
                slot.proxy.backend = parse_address(slot.address)
            self.metrics.up.labels(name).set(1)
            self.log("adopted", server=name, pid=ident.pid, digest=slot.digest)
        self.save_state()

    # --- GPUs ---------------------------------------------------------------------------
    def _gpu_list(self, indexes: list[int]) -> list[dict]:
        return [{"index": i, "uuid": self.gpus.uuids[i]} for i in indexes]

    def _gpus_changed(self) -> None:
        with self._lock:
            self.metrics.gpu_assignments([(i, u, h.removesuffix(NEXT)) for i, u, h in self.gpus.assignments()],
                                         self.gpus.free_count())

    def _take_gpus(self, slot: Slot) -> bool:
        """Give a slot about to start the GPUs it wants (those it had first, while free);
        False, and the slot WAITING with the reason, when too few are free."""
        cfg = slot.cfg
        if not cfg.gpus or slot.gpus:
            return True
        with self._lock:
            got = self.gpus.assign(cfg.name, cfg.gpus, share=cfg.share_gpus, prefer=slot.last_gpus)
            if isinstance(got, str):
                if slot.state != State.WAITING or slot.last_error != got:
                    self.log("waiting_for_gpus", server=cfg.name, reason=got)
                slot.state, slot.last_error = State.WAITING, got
                return False
            slot.gpus = self._gpu_list(got)
            if slot.state == State.WAITING:
                slot.state = State.RESTARTING if slot.started_at else State.STARTING
                slot.last_error = None
            self._gpus_changed()
        self.log("gpus_assigned", server=cfg.name, gpus=[g["uuid"] for g in slot.gpus])
        return True

    def _release_gpus(self, slot: Slot) -> None:
        """The slot's server is gone (stopped, dead, never started): its GPUs are free
        again; it remembers them, to take them again if still free when it restarts."""
        with self._lock:
            freed = self.gpus.free(slot.name)
            if not freed:
                return
            slot.last_gpus, slot.gpus = freed, []
            self._gpus_changed()
        self.log("gpus_freed", server=slot.name, gpus=[self.gpus.uuids[i] for i in freed])

    def _adopt_gpus(self, slot: Slot, uuids: object) -> None:
        """An adopted server keeps the GPUs recorded for it (it runs on them)."""
        if not isinstance(uuids, list) or not uuids:
            return
        with self._lock:
            indexes = self.gpus.indexes(u for u in uuids if isinstance(u, str))
            self.gpus.take(slot.name, indexes, share=slot.cfg.share_gpus)
            slot.gpus = self._gpu_list(indexes)
            self._gpus_changed()
        if len(indexes) != len(uuids):
            self.log("warning", message=f"{slot.name}: GPUs recorded for it are not on this node now",
                     recorded=uuids, found=[g["uuid"] for g in slot.gpus])

    # --- starting and stopping --------------------------------------------------------
    def _run(self, slot: Slot, ref: str, mode: str, gpus: list[str]) -> dict:
        from ..restore import run

        cfg = slot.cfg
        publish = "0" if cfg.publish else None  # a container gets a free port; the proxy fronts it
        placed: dict[str, Any] = {"gpus": gpus} if gpus else {}  # none given: it sees what it sees anyway
        return run(ref, registry=cfg.registry, mode=mode, store=self.store, publish=publish,
                   trust_policy=Path(cfg.trust_policy) if cfg.trust_policy else None,
                   cache_max=self.config.cache_max, lazy_pages=cfg.lazy_pages, **placed)

    def _prefetch(self, cfg: ServerConfig, digest: str) -> None:
        from ...runtime.erofs import can_mount
        from ..pull import pull

        pull(f"{cfg.snapshot_name}@{digest}", registry=cfg.registry, store=self.store, images=can_mount(),
             trust_policy=Path(cfg.trust_policy) if cfg.trust_policy else None)

    def _resolve(self, cfg: ServerConfig) -> str:
        from ...registry import default_registry_url, open_registry, parse_ref

        reg = open_registry(cfg.registry or default_registry_url(self.store.home))
        return reg.resolve(parse_ref(cfg.ref))

    def start(self, slot: Slot, digest: str | None = None, gpus: list[dict] | None = None) -> dict | None:
        """Start the slot's server (on ``gpus``, else the slot's own); None when that failed."""
        cfg = slot.cfg
        mode = "cold" if slot.restore_failures >= cfg.cold_after else "auto"
        ref = f"{cfg.snapshot_name}@{digest}" if digest else cfg.ref
        uuids = [g["uuid"] for g in (slot.gpus if gpus is None else gpus)]
        try:
            out = self._run(slot, ref, mode, uuids)
        except (SnapbuildError, OSError) as e:
            slot.last_error = e.message if isinstance(e, SnapbuildError) else f"{type(e).__name__}: {e}"
            self.metrics.errors.labels(cfg.name).inc()
            if _refusal(e):
                self._refuse(slot, digest, e)
                return None
            self._back_off(slot)
            self.log("start_failed", server=cfg.name, ref=ref, error=slot.last_error, retry_in_s=round(slot.backoff, 2))
            return None
        if mode == "auto" and out["mode"] == "cold":
            slot.restore_failures += 1
        elif out["mode"] == "restore":
            slot.restore_failures = 0
        self.metrics.started(cfg.name, out, out.get("fetch"))
        self.log("started", server=cfg.name, ref=ref, digest=out["digest"], mode=out["mode"], reason=out["reason"],
                 verify=out.get("verify"), pid=out["pid"], timings=out["timings"],
                 **({"gpus": out.get("gpus", uuids)} if uuids else {}))
        return out

    def _adopt_out(self, slot: Slot, out: dict, gpus: list[dict] | None = None) -> bool:
        """Make a started server the slot's (on ``gpus``: a roll's successor's); False (and
        the server stopped) when its node port cannot be served, or when the agent is
        shutting down meanwhile."""
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
            slot.refused = None
            if gpus is not None:
                slot.gpus = gpus
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

    def _refuse(self, slot: Slot, digest: str | None, e: Exception) -> None:
        """Its snapshot ``digest`` (None: what its tag names now) was refused: not tried
        again for REFUSED_BACKOFF_S, doubling while the same digest is refused again, or
        until its tag moves; a slot with no server running waits in REFUSED meanwhile."""
        if digest is None:
            try:
                digest = self._resolve(slot.cfg)
            except SnapbuildError:
                pass
        last = slot.refused
        backoff = (min(REFUSED_BACKOFF_MAX_S, last["backoff_s"] * 2) if last and last["digest"] == digest
                   else REFUSED_BACKOFF_S)
        reason = e.message if isinstance(e, SnapbuildError) else str(e)
        slot.refused = {"digest": digest, "reason": reason, "backoff_s": backoff, "until": time.monotonic() + backoff}
        if slot.ident is None:
            slot.state, slot.next_try = State.REFUSED, slot.refused["until"]
        self.log("snapshot_refused", server=slot.name, digest=digest, error=reason, retry_in_s=backoff)

    def _still_refused(self, slot: Slot, digest: str) -> bool:
        r = slot.refused
        return r is not None and r["digest"] == digest and time.monotonic() < r["until"]

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
        if slot.state == State.REFUSED and slot.ident is None and now < slot.next_try:
            if now >= slot.next_poll:  # a new version need not wait for the back-off
                slot.next_poll = now + self.config.poll_s
                return "retry", lambda: self._retry_if_moved(slot)
            return None
        if slot.ident is None and now >= slot.next_try:
            if not self._take_gpus(slot):
                return None  # WAITING: looked at again next tick
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
        else:
            self._release_gpus(slot)

    def _died(self, slot: Slot, now: float) -> None:
        cfg = slot.cfg
        if slot.ident:
            process.reap([slot.ident.pid])
        process.reap_namespace_inits()  # a restored server's keeper exits with it (runtime.pidns)
        self.log("server_died", server=cfg.name, pid=slot.pid, mode=slot.mode)
        self.metrics.crashes.labels(cfg.name).inc()
        self.metrics.up.labels(cfg.name).set(0)
        if slot.container:
            self._stop_process(slot.container, None)  # its forwarder, mounts, netns
        self._release_gpus(slot)  # before the restart: another server may take them meanwhile
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
        known = slot.refused["digest"] if slot.state == State.REFUSED and slot.refused else slot.digest
        if digest != known:
            self.log("retry_new_version", server=slot.cfg.name, digest=digest)
            slot.deaths.clear()
            slot.state, slot.next_try, slot.backoff, slot.restore_failures = State.RESTARTING, 0.0, 0.0, 0
            if not self._take_gpus(slot):
                return  # WAITING: the loop starts it once GPUs are free
            out = self.start(slot, digest)
            if not (out and self._adopt_out(slot, out)):
                self._release_gpus(slot)

    def poll(self, slot: Slot) -> None:
        """Roll when the tag names another digest now; a registry that does not answer
        leaves the running version alone."""
        try:
            digest = self._resolve(slot.cfg)
        except SnapbuildError as e:
            self.log("poll_failed", server=slot.cfg.name, error=e.message)
            return
        if digest != slot.digest and not self._still_refused(slot, digest):
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
            if _refusal(e):
                self._refuse(slot, digest, e)  # the old version serves on; polls skip this digest meanwhile
            return False
        # A container, or a host process in namespaces of its own behind the node port, runs
        # beside its successor until that one is ready; a plain host process holds its
        # port: it goes first.
        beside = bool(old_container or (old_address and slot.proxy))
        gpus = self._successor_gpus(slot) if beside else slot.gpus
        if gpus is None:  # too few GPUs for both at once: the successor takes the old one's
            beside, gpus = False, slot.gpus
        if not beside:
            self._stop_process(old_container, old_ident)
        out = self.start(slot, digest, gpus)
        if out is None:
            self.metrics.rolls.labels(cfg.name, "failed").inc()
            if beside:
                self._free_successor_gpus(slot)
                return False  # the old version keeps serving; the next poll tries again
            with self._lock:
                slot.ident = slot.container = None
            if self._still_refused(slot, digest):
                slot.state, slot.next_try = State.REFUSED, slot.refused["until"] if slot.refused else 0.0
            self._release_gpus(slot)
            return False
        if not self._adopt_out(slot, out, gpus):
            if beside:
                self._free_successor_gpus(slot)
            return False
        if beside:
            old = parse_address(old_address)
            if slot.proxy and old:
                slot.proxy.drain(old)
            self._stop_process(old_container, None if old_container else old_ident)
            self._successor_took_over(slot)
        self.metrics.rolls.labels(cfg.name, "ok").inc()
        self.log("rolled", server=cfg.name, digest=digest, mode=out["mode"])
        return True

    def _successor_gpus(self, slot: Slot) -> list[dict] | None:
        """GPUs for a successor that runs beside the old version: others than the old
        one's (``[]`` when the server takes none); None, logged, when too few are free."""
        cfg = slot.cfg
        if not cfg.gpus:
            return []
        with self._lock:
            got = self.gpus.assign(cfg.name + NEXT, cfg.gpus, share=cfg.share_gpus,
                                   exclude=[g["index"] for g in slot.gpus])
            if isinstance(got, str):
                self.log("roll_stop_first", server=cfg.name, reason=f"no second set of {cfg.gpus} GPU(s) for the "
                         f"new version beside the old ({got}): the old one stops first, the new one gets its GPUs")
                return None
            self._gpus_changed()
        return self._gpu_list(got)

    def _free_successor_gpus(self, slot: Slot) -> None:
        with self._lock:
            if self.gpus.free(slot.name + NEXT):
                self._gpus_changed()

    def _successor_took_over(self, slot: Slot) -> None:
        """The old version has stopped: its GPUs are free, the successor's are the slot's."""
        with self._lock:
            if not self.gpus.held(slot.name + NEXT):
                return
            self.gpus.free(slot.name)
            self.gpus.rename(slot.name + NEXT, slot.name)
            self._gpus_changed()

    def prepare(self) -> None:
        """What comes before the loop: SIGTERM and SIGINT end it, restored servers are
        re-parented to this process (not to init), and the servers of a previous run are
        adopted (:meth:`adopt`). The HTTP API is not the supervisor's: see :mod:`.serve`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        process.become_subreaper()  # restored servers are re-parented here, not to init
        self.warn_if_unverified()
        self.adopt()

    def loop(self, interval: float = 0.25) -> None:
        """Look at every slot each ``interval`` seconds (:meth:`tick`) until stopped (SIGTERM,
        SIGINT or :meth:`shutdown`)."""
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(interval)

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
            self._release_gpus(slot)
            self._free_successor_gpus(slot)
            if slot.proxy:
                slot.proxy.close()
        self.save_state()


def _refusal(e: Exception) -> bool:
    """Whether a start or pull failed because of the snapshot itself (corrupt, hostile,
    untrusted: trying again soon gives the same answer), not the node or the network."""
    from ...errors import IntegrityError
    from ...signing import UntrustedSnapshot

    return isinstance(e, (IntegrityError, UntrustedSnapshot))


def _json_log(record: dict) -> None:
    import sys

    record = {"ts": round(time.time(), 3), **record}
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()
