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
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..engines import CONTAINER_ENGINES, get_engine
from ..engines.fingerprint import compare
from ..errors import IntegrityError, NotFound, SnapbuildError, UsageError
from ..runtime import probe as probes
from ..runtime import process, server, treeimages
from ..store.fsutil import flock
from ..store import Store
from ..runtime.trees import ensure_tree
from .pull import pull


class RestoreFailed(SnapbuildError):
    """The snapshot could not be restored and ``--fallback fail`` forbade a cold boot."""

    exit_code = 9


def run(ref: str, *, registry: str | None = None, fallback: str = "cold", mode: str = "auto",
        store: Store | None = None, jobs: int = 16, publish: str | None = None,
        trust_policy: Path | None = None, cache_max: int | None = None) -> dict:
    """Start the server of snapshot ``ref`` and return what happened, with timings.

    ``mode``: ``auto`` (restore, else fall back), ``restore`` (never boot cold), or
    ``cold`` (always boot cold; for comparisons). ``publish``: for containers, the host
    port (``HOST`` or ``HOST:CONTAINER``; ``0`` picks a free one) that reaches the
    server; the default is the container's own port number. ``trust_policy``: a
    snapshot the policy does not accept is refused before it is fetched (exit 10).
    """
    if fallback not in ("cold", "fail") or mode not in ("auto", "restore", "cold"):
        raise UsageError(f"fallback must be cold|fail and mode auto|restore|cold, not {fallback}/{mode}")
    if mode == "restore":
        fallback = "fail"
    store = store or Store()
    t0 = time.monotonic()
    kw = dict(registry=registry, store=store, jobs=jobs, trust_policy=trust_policy, cache_max=cache_max)
    try:
        out = _start(pull(ref, images=treeimages.can_mount(), **kw), store, fallback, mode, publish)
    except treeimages.ImageUnusable as e:
        # This node cannot mount the snapshot's tree images after all: its trees are
        # fetched and written out as they are instead.
        out = _start(pull(ref, images=False, **kw), store, fallback, mode, publish)
        out["tree_images"] = f"not used: {e.message}"
    out["timings"]["total_s"] = round(time.monotonic() - t0, 4)
    return out


def _start(fetched: dict, store: Store, fallback: str, mode: str, publish: str | None) -> dict:
    """Restore (or boot cold) the server of the pulled snapshot ``fetched``."""
    config = fetched["config"]
    runtime = config.get("runtime")
    if not runtime:
        raise NotFound(f"snapshot {fetched['ref']} holds no checkpoint: there is no server to run",
                       hint="build a recipe with a `checkpoint` step to get one")
    if runtime.get("format") != server.FORMAT:
        raise IntegrityError(f"snapshot {fetched['ref']} has a checkpoint of format {runtime.get('format')!r}; "
                             f"this runner reads format {server.FORMAT}",
                             hint="upgrade snapbuild on this node to the version that built the snapshot")
    if fetched.get("tree_images"):  # mount the trees and layers that have an image (see treeimages)
        runtime = {**runtime, "server": {**runtime["server"], "tree_images": config["tree_images"]}}
    spec = runtime["server"]
    timings = {"fetch_s": fetched["timings"]["total_s"]}
    out = {"ref": fetched["ref"], "digest": fetched["digest"], "mode": None, "reason": None, "pid": None,
           "log": str(Path(spec["run_dir"]) / server.LOG_NAME), "mismatches": [], "timings": timings,
           "fetch": {k: fetched[k] for k in ("blobs_fetched", "bytes_fetched", "blobs_total")},
           "tree_images": "used" if fetched.get("tree_images") else None}
    if fetched.get("tree_images_refused") and config.get("tree_images"):
        out["tree_images"] = f"not used: {fetched['tree_images_refused']}"
    in_container = runtime["engine"] in CONTAINER_ENGINES
    host_port = _host_port(publish, spec) if in_container else None
    if publish is not None and not in_container:
        raise UsageError("--publish is for container snapshots; a host process listens on the port it was "
                         "built with")

    reason = "cold boot requested" if mode == "cold" else _why_not_restorable(runtime, out)
    if reason is None:
        try:
            if in_container:
                _describe(out, _restore_container(runtime, store, timings, host_port))
            else:
                out["pid"] = _restore(runtime, store, timings)
            out["mode"] = "restore"
        except _NoRestore as e:
            reason = str(e)
    if out["mode"] is None:
        if fallback == "fail" and mode != "cold":
            raise RestoreFailed(f"cannot restore {fetched['ref']}: {reason}",
                                hint="run with --fallback cold to boot the server cold instead")
        if in_container:
            _describe(out, _cold_container(runtime, store, timings, host_port))
        else:
            out["pid"] = _cold(spec, store, timings)
        out["mode"] = "cold"
        out["reason"] = reason
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
    if runtime.get("gpu"):
        from ..gpu.snapshot import mismatches as gpu_mismatches

        mismatches += gpu_mismatches(runtime["gpu"])
    out["mismatches"] = [m.to_json() for m in mismatches]
    fatal = [m.message for m in mismatches if m.fatal]
    return "fingerprint mismatch: " + "; ".join(fatal) if fatal else None


def _restore(runtime: dict, store: Store, timings: dict) -> int:
    spec = runtime["server"]
    engine = get_engine(runtime["engine"])
    t = time.monotonic()
    server.check_port_free(spec)
    # The images are written out (verified) once per node, on tmpfs when there is
    # one, and reused by later restores of the same checkpoint: CRIU only reads them.
    with ThreadPoolExecutor(max_workers=1) as beside:  # written out while the inputs are
        checkpoint = beside.submit(ensure_tree, store.blobs, runtime["artifact"], _images_root(spec))
        run_dir, _env, _mounted = server.prepare(spec, store.blobs)  # mounts stay for the server
    ckpt, _ = checkpoint.result()
    log = run_dir / server.LOG_NAME
    log.touch()  # CRIU reopens the server's log by path
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
    _resume_gpu(runtime, timings, lambda: process.stop(pid))
    _after_restore(runtime, spec["ready"], timings, lambda: process.stop(pid))
    _wait_restored(spec["ready"], log, lambda: process.alive(pid), lambda: process.stop(pid), timings)
    return pid


def _after_restore(runtime: dict, ready: dict, timings: dict, give_up) -> None:
    """The checkpoint's `after_restore` calls (e.g. waking a server that slept for its
    checkpoint), made before the readiness probe."""
    items = runtime.get("after_restore") or []
    if not items:
        return
    t = time.monotonic()
    try:
        probes.run_exercise(items, base=probes.base_url(ready), log=lambda _msg: None, timeout=120)
    except probes.ProbeFailed as e:
        give_up()
        raise _NoRestore(f"after_restore failed: {e}") from None
    timings["after_restore_s"] = round(time.monotonic() - t, 4)


def _resume_gpu(runtime: dict, timings: dict, give_up, prefix: list[str] | None = None) -> None:
    """GPU state back on the GPU and CUDA unlocked, for a snapshot taken with gpu: cuda."""
    if not runtime.get("gpu"):
        return
    from ..gpu.snapshot import resume

    t = time.monotonic()
    try:
        timings.update(resume(runtime["gpu"], prefix=prefix))
    except SnapbuildError as e:
        give_up()
        raise _NoRestore(f"the GPU state did not come back: {e.message}") from None
    timings["gpu_s"] = round(time.monotonic() - t, 4)


def _wait_restored(ready: dict, log: Path, alive, give_up, timings: dict) -> None:
    """Probe a restored server, timed as ``ready_s``; one that never gets ready is
    ``give_up()``-ed (stopped, or its container removed) and the restore counts as
    failed. A log line or a file marks a start-up event that it went through before
    its checkpoint and will not repeat: then ready is being alive."""
    t = time.monotonic()
    try:
        if probes.probe_kind(ready) in probes.STARTUP_EVENT_KINDS:
            if not alive():
                raise probes.ProbeFailed("the restored server exited")
        else:
            probes.wait_ready(ready, log_path=log, alive=alive, timeout=30)
    except probes.ProbeFailed as e:
        give_up()
        raise _NoRestore(f"the restored server did not get ready: {e}") from None
    timings["ready_s"] = round(time.monotonic() - t, 4)


def _cold(spec: dict, store: Store, timings: dict) -> int:
    t = time.monotonic()
    started = server.start(spec, store.blobs, fresh_log=False)
    timings["materialize_s"] = round(timings.get("materialize_s", 0) + time.monotonic() - t, 4)
    t = time.monotonic()
    try:
        started.wait_ready(spec["ready"])
    except probes.ProbeFailed as e:
        process.stop(started.pid)
        raise RestoreFailed(f"cold boot failed too: {e}\n{process.tail(started.log_path, 10)}") from None
    timings["ready_s"] = round(time.monotonic() - t, 4)
    return started.pid


def _host_port(publish: str | None, spec: dict) -> int | None:
    addr = probes.address(spec.get("ready"))
    if publish is None:
        port = addr[1] if addr else None
    else:
        host, _, container_port = str(publish).partition(":")
        if not host.isdigit() or (container_port and not container_port.isdigit()):
            raise UsageError(f"--publish {publish!r}: expected HOST or HOST:CONTAINER, port numbers")
        if container_port and (not addr or int(container_port) != addr[1]):
            raise UsageError(f"--publish {publish}: the server listens on container port "
                             f"{addr[1] if addr else '(none: its probe names no port)'}")
        port = int(host)
    if port and probes.port_in_use(("127.0.0.1", port)):
        raise UsageError(f"host port {port} is already taken: another server is listening there",
                         hint="publish this one on another port: --publish PORT (0 picks a free one)")
    return port


def _describe(out: dict, inst) -> None:
    out.update(pid=inst.pid, container=inst.id, log=str(inst.log_path),
               address=f"127.0.0.1:{inst.host_port}" if inst.host_port else None)


def _restore_container(runtime: dict, store: Store, timings: dict, host_port: int | None):
    from ..runtime import container

    spec = runtime["server"]
    engine = get_engine(runtime["engine"])
    t = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as beside:  # the checkpoint written out meanwhile
        checkpoint = beside.submit(ensure_tree, store.blobs, runtime["artifact"], _images_root(spec))
        try:
            inst = container.prepare(spec, store.blobs, engine.name, host_port)
        except treeimages.ImageUnusable:
            raise  # run() fetches the trees and writes them out instead
        except SnapbuildError as e:
            raise _NoRestore(f"cannot set up the container: {e.message}") from None
    try:
        ckpt, _ = checkpoint.result()
    except BaseException:
        container.destroy(inst)
        raise
    work = Path(tempfile.mkdtemp(prefix="snapbuild-restore-"))
    try:
        timings["materialize_s"] = round(time.monotonic() - t, 4)
        t = time.monotonic()
        try:
            container.launch(inst, engine, lambda: engine.restore(Path(inst.bundle), inst.id, ckpt / "images", work,
                                                                  options=spec.get("engine_options")))
        except SnapbuildError as e:
            raise _NoRestore(f"restore failed: {e.message}") from None
        timings["restore_s"] = round(time.monotonic() - t, 4)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if runtime.get("gpu"):
        from ..gpu.snapshot import sandbox_prefix

        _resume_gpu(runtime, timings, lambda: container.destroy(inst), prefix=sandbox_prefix(engine, inst.id))
    _after_restore(runtime, container.host_probe(spec, inst), timings, lambda: container.destroy(inst))
    _wait_restored(container.host_probe(spec, inst), inst.log_path, lambda: container.alive(inst),
                   lambda: container.destroy(inst), timings)
    return inst


def _cold_container(runtime: dict, store: Store, timings: dict, host_port: int | None):
    from ..runtime import container

    spec = runtime["server"]
    t = time.monotonic()
    inst = container.start(spec, store.blobs, get_engine(runtime["engine"]), host_port)
    timings["materialize_s"] = round(timings.get("materialize_s", 0) + time.monotonic() - t, 4)
    t = time.monotonic()
    try:
        probes.wait_ready(container.host_probe(spec, inst), log_path=inst.log_path,
                          alive=lambda: container.alive(inst))
    except probes.ProbeFailed as e:
        tail = process.tail(inst.log_path, 10)
        container.destroy(inst)
        raise RestoreFailed(f"cold boot failed too: {e}\n{tail}") from None
    timings["ready_s"] = round(time.monotonic() - t, 4)
    return inst


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
    run_dir = Path(config["runtime"]["server"]["run_dir"])
    path = run_dir / server.LOG_NAME
    if config["runtime"]["engine"] in CONTAINER_ENGINES:  # one run folder per container: the newest
        logs = sorted(run_dir.glob(f"*/{server.LOG_NAME}"), key=lambda p: p.stat().st_mtime)
        path = logs[-1] if logs else path
    if not path.exists():
        raise NotFound(f"no server log at {path}: this snapshot has not run on this node",
                       hint=f"start it with: snapbuild-runner restore {ref}")
    return process.tail(path, lines)


def node_gc(store: Store | None = None, *, dry_run: bool = False) -> dict:
    """Free what no pinned snapshot of this store uses: the input trees and checkpoint
    images this store wrote out (under the run root and the image cache), and its
    unreferenced blobs. A tree that another store on this node also uses stays until
    that store lets it go too. Trees of running servers belong to pinned snapshots."""
    import json

    from ..runtime.process import run_root
    from ..runtime.trees import release, tree_dir

    store = store or Store()
    keep: set[Path] = set()
    roots = {run_root(), _images_root({"run_root": str(run_root())})}
    for path in store.pin_files():
        try:
            manifest = json.loads(store.blobs.get(json.loads(path.read_text())["manifest"]))
            runtime = json.loads(store.blobs.get(manifest["config"]["digest"])).get("runtime")
        except (OSError, ValueError, KeyError, SnapbuildError):
            continue
        if not runtime:
            continue
        root, images = Path(runtime["server"]["run_root"]), _images_root(runtime["server"])
        roots |= {root, images}
        keep |= {tree_dir(root, d) for d in runtime["server"]["inputs"].values()}
        keep.add(tree_dir(images, runtime["artifact"]))
        if runtime["server"].get("image"):  # a container's layers, unpacked under the run root
            from ..runtime.container import read_image

            try:
                layers = read_image(store.blobs, runtime["server"]["image"])[0]["layers"]
            except (SnapbuildError, OSError, ValueError, KeyError):
                layers = []
            keep |= {root / "layers" / x["digest"].split(":", 1)[1] for x in layers}
    removed, freed = 0, 0
    in_use: list[str] = []  # trees and layers mounted from images that a process still uses
    for root in roots:
        for p in sorted((root / "trees").glob("*")) if (root / "trees").is_dir() else []:
            if p in keep or p.name.endswith((".partial", ".users")):
                continue
            size = _du(p)
            try:
                gone = release(p, store.home, dry_run=dry_run, before=_unmount_views)
            except SnapbuildError:  # an image mount a process still uses: next time
                in_use.append(str(p))
                continue
            if gone:
                removed += 1
                freed += size
    from ..rootfs import MARKER as LAYER_MARKER
    from ..rootfs import release_layer

    for root in roots:
        cache = root / "layers"
        for marker in sorted(cache.glob(f"*{LAYER_MARKER}")) if cache.is_dir() else []:
            p = cache / marker.name[: -len(LAYER_MARKER)]
            if p in keep:
                continue
            size = _du(p)
            try:
                gone = release_layer(cache, p.name, str(store.home), dry_run=dry_run)
            except SnapbuildError:
                in_use.append(str(p))
                continue
            if gone:
                removed += 1
                freed += size
        # Image files that no mounted tree or layer uses (a write-out cut short).
        images = root / "tree-images"
        for p in sorted(images.iterdir()) if images.is_dir() and not dry_run else []:
            hexpart = p.name.split(".", 1)[0]
            # (under both locks that a write-out takes: one going on is left alone)
            with flock(root / "locks" / f"tree-{hexpart}.lock"), flock(cache / ".locks" / f"{hexpart}.lock"):
                if not ((root / "trees" / f"{hexpart}.users").exists()
                        or (cache / f"{hexpart}{LAYER_MARKER}").exists()) and p.exists():
                    freed += p.stat().st_size
                    p.unlink()
    rep = store.gc(dry_run=dry_run)
    return {"trees_removed": removed, "tree_bytes_freed": freed, "blobs_removed": rep.blobs_removed,
            "blob_bytes_freed": rep.bytes_freed, "dry_run": dry_run, "in_use": in_use}


def _unmount_views(tree: Path) -> None:
    """A host server's `mounts:` show trees at fixed paths: they go with the tree."""
    from ..runtime import mounts

    for point in mounts.mount_points_of(tree):
        mounts.unmount(point)


def _du(path: Path) -> int:
    """Bytes of the regular files under ``path``; symbolic links are not followed."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def stop(target: int | str) -> bool:
    """Stop a server by PID, or a container by its id or init PID: the container, its
    port forwarder, mounts and network namespace go too. True if it was running."""
    from ..runtime import container
    from ..runtime.process import DEFAULT_RUN_ROOT, run_root

    for root in dict.fromkeys([run_root(), Path(DEFAULT_RUN_ROOT)]):
        inst = container.find(root, str(target))
        if inst is not None:
            container.destroy(inst)
            return True
    if not str(target).isdigit():
        return False
    return process.stop(int(target))
