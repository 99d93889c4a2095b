"""The agent's Prometheus metrics (``GET /metrics``)."""

from __future__ import annotations


class Metrics:
    """The agent's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.starts = Counter("snapbuild_server_starts", "Servers started, by how", ["server", "mode"], registry=r)
        self.fallbacks = Counter("snapbuild_fallbacks", "Cold boots instead of a restore, by reason",
                                 ["server", "reason"], registry=r)
        self.checks = Counter("snapbuild_restore_checks", "Restored servers' answers to the check requests "
                              "(verify), by whether they matched the warm-up's", ["server", "result"], registry=r)
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
        self.loop_age = Gauge("snapbuild_agent_loop_age_seconds",
                              "Seconds since the supervisor loop last ran (/healthz fails past its bound)",
                              registry=r)
        self.gpu_assigned = Gauge("snapbuild_gpu_assigned", "1 for each GPU the agent gave a server",
                                  ["gpu", "uuid", "server"], registry=r)
        self.gpus_free = Gauge("snapbuild_gpus_free", "The node's GPUs the agent gave nobody", registry=r)
        self._gpu_labels: set[tuple[str, str, str]] = set()

    def gpu_assignments(self, assigned: list[tuple[int, str, str]], free: int) -> None:
        """Show these (index, UUID, server) assignments, and only these."""
        now = {(str(i), uuid, server) for i, uuid, server in assigned}
        for labels in self._gpu_labels - now:
            self.gpu_assigned.remove(*labels)
        for labels in now:
            self.gpu_assigned.labels(*labels).set(1)
        self._gpu_labels = now
        self.gpus_free.set(free)

    def started(self, name: str, out: dict, fetched: dict | None) -> None:
        self.starts.labels(name, out["mode"]).inc()
        if out.get("verify") in ("same", "different"):
            self.checks.labels(name, out["verify"]).inc()
        if out["mode"] == "cold" and out.get("reason"):
            self.fallbacks.labels(name, reason_kind(out["reason"])).inc()
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


def reason_kind(reason: str) -> str:
    """A small set of label values for fallback reasons (the full text is in the logs)."""
    if "did not finish within" in reason:  # a tool killed at its time limit (snapbuild.tools)
        return "timeout"
    for prefix, kind in (("cold boot requested", "requested"), ("fingerprint mismatch", "fingerprint"),
                         ("restore failed", "restore_failed"), ("the restored server did not get ready", "not_ready"),
                         ("the GPU state", "gpu"), ("after_restore", "after_restore"), ("PID", "pid_taken"),
                         ("engine unusable", "engine"),
                         ("restored server answered the check request differently", "verify")):
        if reason.startswith(prefix) or prefix in reason[:40]:
            return kind
    return "other"
