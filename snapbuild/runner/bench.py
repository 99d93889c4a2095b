"""``snapbuild bench REF``: cold boot to ready versus restore to ready, on this node.

Runs alternate (cold, restore, cold, restore, ...) so that drift in the machine's load
hits both sides alike; each is timed from the runner's start to a passing readiness
probe, then it is asked the snapshot's check requests (``verify``) outside that time and
stopped. Reported: medians, min and max, and the ratio of medians, with the page cache
warm and, where allowed (root), dropped before every run; plus one restore on a node
that has not yet written the checkpoint's images out.

Answers (``answers``): every server, cold or restored, must answer each check request as
the warm-up did (status and body, or the ``compare`` paths of it); an error status is no
answer, even when both modes give the same one. A snapshot without check requests has
nothing to compare, and the report says so (``"compared": null`` and why). Separately,
the runner itself checks every restore (inside the restore's time), and those outcomes
are counted (``verify``: ``{"same": n, "different": n}``).
"""

from __future__ import annotations

import os
import shutil
import statistics
from typing import Any

from ..runtime import probe as probes
from ..runtime import process
from ..runtime.layout import images_root, tree_dir
from ..schema import Runtime, ServerSpec
from ..store import Store
from .pull import pull
from .restore import RestoreFailed, run, stop


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    from ..tools import run

    run(["sync"], timeout=300)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _once(ref: str, mode: str, store: Store, registry: str | None, spec: ServerSpec,
          checks: list[dict] | tuple = (), before_stop=lambda: None) -> tuple[float, dict, str | None]:
    """One start of the server in ``mode``, asked ``checks`` (then ``before_stop()``
    runs) and stopped: its seconds to ready, the runner's result, and how its answers
    differed from the warm-up's (None: they did not, or there was nothing to ask)."""
    out = run(ref, registry=registry, mode=mode, store=store)
    # A container is reached through its published host port, a host process directly.
    base = f"http://{out['address']}" if out.get("address") else probes.base_url(spec.ready)
    try:
        differs = probes.check_answers([probes.on_base(c) for c in checks], base=base) if checks else None
    finally:
        before_stop()
        stop(out.get("container") or out["pid"])
    host, _, port = (out.get("address") or "").rpartition(":")
    addr = (host, int(port)) if port else probes.address(spec.ready)
    for _ in range(100):  # the next run needs the port (and, to restore, the PIDs) back
        if not probes.port_in_use(addr):
            break
        process.wait_gone([out["pid"]], timeout=0.05)
    return out["timings"]["total_s"], out, differs


def to_compare(runtime: Runtime) -> tuple[list[dict], dict]:
    """The check requests every server is asked, with their warm-up answers, and the
    report's ``answers`` as it starts: what is compared, or why nothing is. A request
    whose recorded answer is an error status (``expect: 404``) proves nothing: left out."""
    usable = [c for c in runtime.verify if 200 <= c["answer"]["status"] < 300]
    if usable:
        n = len(usable)
        return usable, {"compared": f"verify ({n} request{'s' if n != 1 else ''})", "same": True, "asked": 0,
                        "different": 0, "first_difference": None}
    why = ("its check requests all expect an error status, which proves nothing" if runtime.verify else
           "the snapshot has no check requests (`verify:` in its checkpoint step), and a snapshot carries no "
           "exercise to ask instead")
    return [], {"compared": None, "why": why}


#: A restore's phases that are CRIU's work (the restore, its memory arriving) and the
#: server's (the first probe); the rest of ``total_s`` is the runner's own.
CRIU_PHASES, PROBE_PHASES = ("restore_s", "pages_s", "gpu_s"), ("ready_s",)


def overhead(timings: list[dict]) -> dict | None:
    """Medians of a restore's own overhead (everything but CRIU and the first probe:
    fetching, checking, writing out, namespaces, verify) against CRIU's time, so that a
    regression in the runner shows apart from the checkpoint's size."""
    if not timings:
        return None
    criu = [sum(t.get(k, 0.0) for k in CRIU_PHASES) for t in timings]
    own = [t["total_s"] - c - sum(t.get(k, 0.0) for k in PROBE_PHASES) for t, c in zip(timings, criu, strict=True)]
    med_own, med_criu = statistics.median(own), statistics.median(criu)
    return {"own_s": round(med_own, 4), "criu_s": round(med_criu, 4),
            "share_of_criu": round(med_own / med_criu, 2) if med_criu else None}


def _summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "runs": [round(v, 4) for v in values]}


def bench(ref: str, *, runs: int = 5, registry: str | None = None, store: Store | None = None,
          drop: bool | None = None, progress=lambda msg: None) -> dict:
    from ..registry import locate

    ref, registry = locate(ref, registry)
    store = store or Store()
    runtime = pull(ref, registry=registry, store=store)["snapshot"].runtime
    if runtime is None:
        from ..errors import NotFound

        raise NotFound(f"{ref} holds no checkpoint to benchmark")
    spec = runtime.server
    drop = can_drop_caches() if drop is None else drop
    process.become_subreaper()  # stop restored servers without waiting for init to reap them

    # One restore where the images are not yet written out on this node.
    shutil.rmtree(tree_dir(images_root(spec.run_root), runtime.images_tree), ignore_errors=True)
    checks, answers = to_compare(runtime)

    def compared(mode: str, differs: str | None) -> None:
        if checks:
            answers["asked"] += 1
            if differs is not None:
                answers.update(same=False, different=answers["different"] + 1)
                answers["first_difference"] = answers["first_difference"] or f"{mode}: {differs}"

    first, first_out, differs = _once(ref, "auto", store, registry, spec, checks)
    if first_out["mode"] != "restore":
        raise RestoreFailed(f"the first restore of {ref} fell back to a cold boot: {first_out['reason']}",
                            hint=f"snapbuild run {ref} shows the same; nothing to compare")
    compared("the first restore", differs)
    progress(f"first restore on this node (images written out): {first:.3f}s")

    phases = [("warm", False)] + ([("dropped", True)] if drop else [])
    result: dict[str, Any] = {"ref": ref, "runs": runs, "restore_first_s": round(first, 4), "answers": answers}
    # how the restored servers answered the checkpoint's check requests: {"same": n, "different": n}
    outcomes: dict[str, int] = {}
    fell_back: list[str] = []  # the reasons of restores that booted cold instead (not in restore_s)

    def count(out: dict) -> None:
        if out.get("verify"):
            outcomes[out["verify"]] = outcomes.get(out["verify"], 0) + 1
        if out["mode"] != "restore":
            fell_back.append(out["reason"])

    count(first_out)
    for label, do_drop in phases:
        cold: list[float] = []
        restored: list[float] = []
        timings: list[dict] = []  # each restore's phases
        for i in range(runs):
            for mode in ("cold", "auto"):
                if do_drop:
                    drop_caches()
                t, out, differs = _once(ref, mode, store, registry, spec, checks)
                compared(f"run {i + 1} ({label} page cache, {out['mode']})", differs)
                if mode == "cold":
                    cold.append(t)
                else:
                    count(out)
                    if out["mode"] == "restore":
                        restored.append(t)
                        timings.append(out["timings"])
                progress(f"[{label} page cache] run {i + 1}/{runs} {out['mode']:<7} {t:.3f}s")
        if not restored:
            raise RestoreFailed(f"every restore of {ref} fell back to a cold boot: {fell_back[-1]}",
                                hint=f"snapbuild run {ref} shows the same; nothing to compare")
        phase = {"cold_s": _summary(cold), "restore_s": _summary(restored),
                 "speedup": round(statistics.median(cold) / statistics.median(restored), 2),
                 "overhead": overhead(timings)}
        result[label] = phase
    if fell_back:
        result["note"] = (f"{len(fell_back)} restore(s) fell back to a cold boot (left out of restore_s), "
                          f"first because: {fell_back[0]}")
    warm = result["warm"]
    result.update(cold_s=warm["cold_s"]["median"], restore_s=warm["restore_s"]["median"], speedup=warm["speedup"],
                  page_cache_dropped=result.get("dropped"))
    result.pop("dropped", None)
    result["checkpoint_bytes"] = runtime.stats.get("pages_bytes")
    result["verify"] = outcomes or None
    return result


__all__ = ["bench", "can_drop_caches", "to_compare"]
