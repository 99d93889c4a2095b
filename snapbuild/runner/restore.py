"""Bring a snapshot's server up on this node: restore it warm, or boot it cold.

    resolve -> fetch missing chunks (verified) -> compatibility check -> materialize
    inputs (once per node) and images (tmpfs) -> restore -> readiness probe

Any reason not to restore (a fingerprint mismatch, a PID still taken, a failed
restore, a restored process that never gets ready) falls back to a cold boot of the
same command from the same artifact, unless ``fallback="fail"``; the reason is
always reported. A node is never left without a server when one can be started.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from ..engines import get_engine
from ..engines.fingerprint import compare
from ..errors import NotFound, SnapbuildError, UsageError
from ..runtime import probe as probes
from ..runtime import process, server
from ..store import Store
from ..runtime.trees import ensure_tree
from .pull import pull


class RestoreFailed(SnapbuildError):
    """The snapshot could not be restored and ``--fallback fail`` forbade a cold boot."""

    exit_code = 9


def run(ref: str, *, registry: str | None = None, fallback: str = "cold", mode: str = "auto",
        store: Store | None = None, jobs: int = 4) -> dict:
    """Start the server of snapshot ``ref`` and return what happened, with timings.

    ``mode``: ``auto`` (restore, else fall back), ``restore`` (never boot cold), or
    ``cold`` (always boot cold; for comparisons).
    """
    if fallback not in ("cold", "fail") or mode not in ("auto", "restore", "cold"):
        raise UsageError(f"fallback must be cold|fail and mode auto|restore|cold, not {fallback}/{mode}")
    if mode == "restore":
        fallback = "fail"
    store = store or Store()
    t0 = time.monotonic()
    fetched = pull(ref, registry=registry, store=store, jobs=jobs)
    config = fetched["config"]
    runtime = config.get("runtime")
    if not runtime:
        raise NotFound(f"snapshot {fetched['ref']} holds no checkpoint: there is no server to run",
                       hint="build a recipe with a `checkpoint` step to get one")
    spec = runtime["server"]
    timings = {"fetch_s": fetched["timings"]["total_s"]}
    out = {"ref": fetched["ref"], "digest": fetched["digest"], "mode": None, "reason": None, "pid": None,
           "log": str(Path(spec["run_dir"]) / server.LOG_NAME), "mismatches": [], "timings": timings}

    reason = "cold boot requested" if mode == "cold" else _why_not_restorable(runtime, out)
    if reason is None:
        try:
            out["pid"] = _restore(runtime, store, timings)
            out["mode"] = "restore"
        except _NoRestore as e:
            reason = str(e)
    if out["mode"] is None:
        if fallback == "fail" and mode != "cold":
            raise RestoreFailed(f"cannot restore {fetched['ref']}: {reason}",
                                hint="run with --fallback cold to boot the server cold instead")
        out["pid"] = _cold(spec, store, timings)
        out["mode"] = "cold"
        out["reason"] = reason
    timings["total_s"] = round(time.monotonic() - t0, 4)
    return out


class _NoRestore(Exception):
    pass


def _why_not_restorable(runtime: dict, out: dict) -> str | None:
    engine = get_engine(runtime["engine"])
    try:
        engine.check()
        node = engine.fingerprint()
    except SnapbuildError as e:
        out["mismatches"].append({"field": "engine", "fatal": True, "message": e.message})
        return f"{runtime['engine']} engine unusable here: {e.message}"
    mismatches = compare(runtime["fingerprint"], node)
    out["mismatches"] = [m.to_json() for m in mismatches]
    fatal = [m.message for m in mismatches if m.fatal]
    return "fingerprint mismatch: " + "; ".join(fatal) if fatal else None


def _port(spec: dict) -> tuple[str, int] | None:
    ready = spec.get("ready") or {}
    if "http" in ready:
        u = urlparse(ready["http"])
        return u.hostname or "127.0.0.1", u.port or 80
    if "tcp" in ready:
        host, _, port = ready["tcp"].rpartition(":")
        return host or "127.0.0.1", int(port)
    return None


def _port_in_use(addr: tuple[str, int] | None) -> bool:
    if addr is None:
        return False
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(addr) == 0


def _check_port_free(spec: dict) -> None:
    addr = _port(spec)
    if _port_in_use(addr):
        raise UsageError(f"port {addr[1]} on {addr[0]} is already taken: another server is running there",
                         hint="stop it first (snapbuild-runner stop PID), or change the recipe's port")


def _restore(runtime: dict, store: Store, timings: dict) -> int:
    spec = runtime["server"]
    engine = get_engine(runtime["engine"])
    t = time.monotonic()
    _check_port_free(spec)
    run_dir, _env = server.prepare(spec, store.blobs)
    log = run_dir / server.LOG_NAME
    log.touch()  # CRIU reopens the server's log by path
    # The images are written out (verified) once per node, on tmpfs when there is
    # one, and reused by later restores of the same checkpoint: CRIU only reads them.
    ckpt, _ = ensure_tree(store.blobs, runtime["artifact"], _images_root(spec))
    images = ckpt / "images"
    work = Path(tempfile.mkdtemp(prefix="snapbuild-restore-"))
    try:
        busy = [p for p in runtime["pids"] if not process.wait_gone([p], timeout=3)]
        if busy:
            raise _NoRestore(f"PID {busy[0]} is in use by another process (a host-process snapshot restores "
                             "with its original PIDs; is the same snapshot already running here?)")
        timings["materialize_s"] = round(time.monotonic() - t, 4)
        t = time.monotonic()
        try:
            pid = engine.restore(images, work)
        except SnapbuildError as e:
            process.wait_gone(runtime["pids"], timeout=3)  # what a failed restore left behind
            raise _NoRestore(f"restore failed: {e.message}") from None
        timings["restore_s"] = round(time.monotonic() - t, 4)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t = time.monotonic()
    try:
        probes.wait_ready(spec["ready"], log_path=log, alive=lambda: process.alive(pid), timeout=30)
    except probes.ProbeFailed as e:
        process.stop(pid)
        raise _NoRestore(f"the restored server did not get ready: {e}") from None
    timings["ready_s"] = round(time.monotonic() - t, 4)
    return pid


def _cold(spec: dict, store: Store, timings: dict) -> int:
    t = time.monotonic()
    _check_port_free(spec)
    started = server.start(spec, store.blobs, fresh_log=False)
    timings["materialize_s"] = round(timings.get("materialize_s", 0) + time.monotonic() - t, 4)
    t = time.monotonic()
    try:
        probes.wait_ready(spec["ready"], log_path=started.log_path, alive=lambda: started.proc.poll() is None)
    except probes.ProbeFailed as e:
        process.stop(started.pid)
        raise RestoreFailed(f"cold boot failed too: {e}\n{process.tail(started.log_path, 10)}") from None
    timings["ready_s"] = round(time.monotonic() - t, 4)
    return started.pid


def _images_root(spec: dict) -> Path:
    """Where checkpoint images are written out: $SNAPBUILD_IMAGE_CACHE, else tmpfs when
    there is one (restore reads every page image), else the run root."""
    if os.environ.get("SNAPBUILD_IMAGE_CACHE"):
        return Path(os.environ["SNAPBUILD_IMAGE_CACHE"])
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / "snapbuild"
    return Path(spec["run_root"])


def server_log(ref: str, *, registry: str | None = None, lines: int = 50, store: Store | None = None) -> str:
    """The end of the server log of snapshot ``ref`` on this node."""
    config = pull(ref, registry=registry, store=store or Store())["config"]
    if not config.get("runtime"):
        raise NotFound(f"snapshot {ref} holds no checkpoint: it has no server log")
    path = Path(config["runtime"]["server"]["run_dir"]) / server.LOG_NAME
    if not path.exists():
        raise NotFound(f"no server log at {path}: this snapshot has not run on this node",
                       hint=f"start it with: snapbuild-runner restore {ref}")
    return process.tail(path, lines)


def node_gc(store: Store | None = None, *, dry_run: bool = False) -> dict:
    """Free what no pinned snapshot on this node uses: written-out input trees under the
    run root, cached checkpoint images, and unreferenced blobs in the node's store.
    Trees of running servers belong to pinned snapshots, so they stay."""
    import json

    from ..runtime.process import run_root
    from ..runtime.trees import tree_dir

    store = store or Store()
    keep_inputs: set[Path] = set()
    keep_images: set[Path] = set()
    roots = {run_root()}
    for path in store.pin_files():
        try:
            manifest = json.loads(store.blobs.get(json.loads(path.read_text())["manifest"]))
            runtime = json.loads(store.blobs.get(manifest["config"]["digest"])).get("runtime")
        except (OSError, ValueError, KeyError, SnapbuildError):
            continue
        if not runtime:
            continue
        root = Path(runtime["server"]["run_root"])
        roots.add(root)
        keep_inputs |= {tree_dir(root, d) for d in runtime["server"]["inputs"].values()}
        keep_images.add(tree_dir(_images_root(runtime["server"]), runtime["artifact"]))
    removed, freed = 0, 0
    candidates = [p for r in roots for p in (r / "trees").glob("*") if p not in keep_inputs]
    images = Path(os.environ.get("SNAPBUILD_IMAGE_CACHE") or "/dev/shm/snapbuild") / "trees"
    candidates += [p for p in images.glob("*") if p not in keep_images] if images.is_dir() else []
    for p in candidates:
        removed += 1
        freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        if not dry_run:
            shutil.rmtree(p, ignore_errors=True)
    rep = store.gc(dry_run=dry_run)
    return {"trees_removed": removed, "tree_bytes_freed": freed, "blobs_removed": rep.blobs_removed,
            "blob_bytes_freed": rep.bytes_freed, "dry_run": dry_run}


def stop(pid: int) -> bool:
    return process.stop(pid)
