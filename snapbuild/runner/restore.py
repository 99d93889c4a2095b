"""Bring a snapshot's server up on this node: restore it warm, or boot it cold.

    resolve -> fetch missing chunks (verified) -> compatibility check -> materialize
    inputs (once per node) and images (tmpfs) -> restore -> readiness probe

Any reason not to restore (a fingerprint mismatch, a PID still taken, a failed
restore, a restored process that never gets ready or answers a check request of the
checkpoint's ``verify`` otherwise than at the warm-up) falls back to a cold boot of the
same command from the same artifact, unless ``fallback="fail"``; the reason is
always reported. A node is never left without a server when one can be started.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..engines import container_engine, criu, get_engine, process_engine
from ..engines.fingerprint import compare
from ..errors import NotFound, SnapbuildError, UsageError
from ..runtime import probe as probes
from ..runtime import erofs, mounts, process, runfiles, server, shmfiles, sockdirs
from ..runtime.layout import images_root
from ..store import Store
from ..store.direct import Direct
from ..runtime.trees import ensure_tree
from ..schema import Runtime, ServerSpec, SnapshotConfig
from .. import settings
from .pull import pull

log = logging.getLogger(__name__)


class RestoreFailed(SnapbuildError):
    """The snapshot could not be restored and ``--fallback fail`` forbade a cold boot."""

    exit_code = 9


def run(ref: str, *, registry: str | None = None, fallback: str = "cold", mode: str = "auto",
        store: Store | None = None, jobs: int = 16, publish: str | None = None,
        trust_policy: Path | None = None, cache_max: int | None = None, lazy_pages: bool | None = None,
        gpus: list[str] | None = None) -> dict:
    """Start the server of snapshot ``ref`` and return what happened, with timings.

    ``mode``: ``auto`` (restore, else fall back), ``restore`` (never boot cold), or
    ``cold`` (always boot cold; for comparisons). ``publish``: for containers, the host
    port (``HOST`` or ``HOST:CONTAINER``; ``0`` picks a free one) that reaches the
    server; the default is the container's own port number. ``trust_policy``: a
    snapshot the policy does not accept is refused before it is fetched (exit 10).
    ``lazy_pages``: a host process restores with CRIU's lazy pages (its memory follows
    on demand; the call returns once every page is in place, ``pages_s``); None:
    :func:`lazy_default`. ``gpus``: the GPUs (indexes or UUIDs) the server goes to, one
    per GPU of its CUDA state (see snapbuild.gpu.placement); None: those it was taken
    on when this node has them, else the first ones.
    """
    lazy_pages = lazy_default() if lazy_pages is None else lazy_pages
    criu.thp_setting()  # a bad $SNAPBUILD_THP_FILL is refused whatever the restore turns out to be
    from ..registry import locate

    ref, registry = locate(ref, registry)
    if fallback not in ("cold", "fail") or mode not in ("auto", "restore", "cold"):
        raise UsageError(f"fallback must be cold|fail and mode auto|restore|cold, not {fallback}/{mode}")
    if mode == "restore":
        fallback = "fail"
    store = store or Store()
    t0 = time.monotonic()

    def start(images: bool) -> dict:
        fetched = pull(ref, registry=registry, store=store, jobs=jobs, trust_policy=trust_policy,
                       cache_max=cache_max, images=images, direct=direct_default())
        return _start_server(fetched, store, fallback, mode, publish, lazy_pages, gpus)

    try:
        out = start(erofs.can_mount())
    except erofs.ImageUnusable as e:
        # This node cannot mount the snapshot's tree images after all: its trees are
        # fetched and written out as they are instead.
        log.warning("%s: tree images cannot be mounted here (%s); writing the trees out instead", ref, e.message)
        out = start(False)
        out["tree_images"] = f"not used: {e.message}"
    out["timings"]["total_s"] = round(time.monotonic() - t0, 4)
    return out


def lazy_default() -> bool:
    """The node setting ``lazy_pages`` (``$SNAPBUILD_LAZY_PAGES``), else on: lazy pages always answered first, and
    had every page in place sooner than a plain restore with small pages (one with huge
    pages, criu.thp_fill_unused, has them in place sooner; docs/benchmarks.md)."""
    return bool(settings.get("lazy_pages"))


def direct_default() -> bool:
    """The node setting ``pull_direct`` (``$SNAPBUILD_PULL_DIRECT``), else on: whether a restore writes what it
    writes out once per node (the checkpoint's images, input trees, layers, tree images)
    straight from the registry to its place, without storing the chunks first
    (store.direct; 1.3-1.6x faster on an empty node: docs/benchmarks.md)."""
    return bool(settings.get("pull_direct"))


def _start_server(fetched: dict, store: Store, fallback: str, mode: str, publish: str | None,
                  lazy_pages: bool = False, gpus: list[str] | None = None) -> dict:
    """:func:`_bring_up`, with the host mounts it makes recorded as the server's: this
    runner holds them while it works (a ``gc`` meanwhile leaves them), the server once
    it runs; ``stop`` and ``gc`` unmount them once no server of the node uses them."""
    runtime = fetched["snapshot"].runtime
    spec = runtime.server if runtime is not None else None
    if spec is None or spec.image is not None or not spec.mounts:
        return _bring_up(fetched, store, fallback, mode, publish, lazy_pages, gpus)
    root, dests = Path(spec.run_root), [Path(d) for d in spec.mounts]
    token = mounts.claim(root, dests, os.getpid())
    try:
        out = _bring_up(fetched, store, fallback, mode, publish, lazy_pages, gpus)
        mounts.claim(root, dests, out["pid"])
        return out
    finally:
        mounts.release(root, token)


def _bring_up(fetched: dict, store: Store, fallback: str, mode: str, publish: str | None,
              lazy_pages: bool = False, gpus: list[str] | None = None) -> dict:
    snapshot: SnapshotConfig = fetched["snapshot"]  # checked in full for this node (schema)
    runtime = snapshot.runtime
    if runtime is None:
        raise NotFound(f"snapshot {fetched['ref']} holds no checkpoint: there is no server to run",
                       hint="build a recipe with a `checkpoint` step to get one")
    if fetched.get("tree_images"):  # mount the trees and layers that have an image (see runtime.erofs)
        runtime = replace(runtime, server=replace(runtime.server, tree_images=snapshot.tree_images))
    spec = runtime.server
    direct = fetched.get("blobs")
    if isinstance(direct, Direct):  # what the pull left out is read from the registry as it is written out
        store = copy.copy(store)
        store.blobs = direct  # type: ignore[assignment]
    timings = {"fetch_s": fetched["timings"]["total_s"]}
    out = {"ref": fetched["ref"], "digest": fetched["digest"], "mode": None, "reason": None, "pid": None,
           "log": str(Path(spec.run_dir) / server.LOG_NAME), "mismatches": [], "timings": timings,
           "fetch": {k: fetched[k] for k in ("blobs_fetched", "bytes_fetched", "blobs_total")},
           "tree_images": "used" if fetched.get("tree_images") else None,
           # the check requests: None (the snapshot has none), "same", "different", "not asked"
           "verify": "not asked" if runtime.verify else None,
           "lazy_pages": "not used: a container restores all its memory first" if lazy_pages and
           runtime.in_container else None,
           "gpus": None, "device_map": {}}  # where the server was placed (snapbuild.gpu.placement)
    if fetched.get("tree_images_refused") and snapshot.tree_images is not None:
        out["tree_images"] = f"not used: {fetched['tree_images_refused']}"
    in_container = runtime.in_container
    isolated = spec.isolation == "namespaces"
    if publish is not None and not (in_container or isolated):
        raise UsageError("--publish is for container snapshots and host processes in namespaces of their own; "
                         "this host process listens on the port it was built with",
                         hint="build it with `isolation: namespaces` in its checkpoint step to run replicas "
                              "side by side, each on its own published port")
    host_port = _host_port(publish, spec) if in_container or isolated else None
    node_gpus = _node_gpus(runtime, gpus)

    reason = "cold boot requested" if mode == "cold" else _why_not_restorable(runtime, out, node_gpus)
    placement = None
    if reason is None and runtime.gpu:
        from ..gpu.placement import place

        placement, why = place(runtime.gpu, node_gpus, gpus)
        reason = None if why is None else f"the GPU state cannot be placed here: {why}"
    if reason is None:
        try:
            if placement is not None:
                out.update(placement.to_json())
            if in_container:
                _describe(out, _restore_container(runtime, store, timings, host_port, placement, out))
            else:
                out["pid"], out["address"] = _restore(runtime, store, timings, lazy_pages, out, host_port,
                                                      placement)
            out["mode"] = "restore"
            out["verify"] = "same" if runtime.verify else None
        except _NoRestore as e:
            reason = str(e)
            if isinstance(e, _Differs):
                out["verify"] = "different"
    if out["mode"] is None:
        if fallback == "fail" and mode != "cold":
            raise RestoreFailed(f"cannot restore {fetched['ref']}: {reason}",
                                hint="run with --fallback cold to boot the server cold instead")
        if mode != "cold":
            log.warning("%s: not restored (%s); booting it cold", fetched["ref"], reason)
        from ..gpu.placement import cold_targets

        targets = cold_targets(runtime.gpu, node_gpus, gpus)
        out.update(gpus=targets, device_map={})
        if in_container:
            _describe(out, _cold_container(runtime, store, timings, host_port, targets))
        else:
            if targets:  # it sees only its GPUs
                spec = replace(spec, env={**spec.env, "CUDA_VISIBLE_DEVICES": ",".join(targets)})
            out["pid"], out["address"] = _cold(spec, store, timings, host_port)
        out["mode"] = "cold"
        out["reason"] = reason
    if isinstance(direct, Direct):
        out["fetch"]["written_straight_out"] = {"blobs": direct.fetched, "bytes": direct.fetched_bytes}
    return out


class _NoRestore(Exception):
    pass


def _node_gpus(runtime: Runtime, gpus: list[str] | None) -> dict | None:
    """This node's GPUs when the placement needs them; ``--gpu`` naming one the node
    lacks is refused here, before anything starts."""
    if not runtime.gpu and not gpus:
        return None
    from ..gpu import fingerprint as gpu_fp
    from ..gpu.placement import resolve

    node = gpu_fp.node_gpus()
    if gpus:
        resolve(gpus, node)
    return node


class _Differs(_NoRestore):
    """The restored server answered a check request otherwise than at the warm-up."""

    PREFIX = "restored server answered the check request differently"


def _why_not_restorable(runtime: Runtime, out: dict, node_gpus: dict | None = None) -> str | None:
    engine = get_engine(runtime.engine)
    try:
        engine.check()
        node = engine.fingerprint()
    except SnapbuildError as e:
        out["mismatches"].append({"field": "engine", "fatal": True, "message": e.message})
        return f"{runtime.engine} engine unusable here: {e.message}"
    mismatches = compare(runtime.fingerprint, node)
    if runtime.gpu:
        from ..gpu.snapshot import mismatches as gpu_mismatches

        mismatches += gpu_mismatches(runtime.gpu, node_gpus)  # nvidia-smi asked once per restore
    out["mismatches"] = [m.to_json() for m in mismatches]
    fatal = [m.message for m in mismatches if m.fatal]
    return "fingerprint mismatch: " + "; ".join(fatal) if fatal else None


def _restore(runtime: Runtime, store: Store, timings: dict, lazy_pages: bool = False,
             out: dict | None = None, host_port: int | None = None, placement=None) -> tuple[int, str | None]:
    """Restore a host-process tree; returns its root's PID and, for a server in
    namespaces of its own, the address this machine reaches it on."""
    spec = runtime.server
    if spec.isolation == "namespaces":
        from ..runtime.portfwd import listen

        listener = listen(server.server_port(spec) if host_port is None else host_port)
        try:
            return _restore_tree(runtime, store, timings, lazy_pages, out, listener, placement)
        finally:
            listener.close()
    server.check_port_free(spec)
    return _restore_tree(runtime, store, timings, lazy_pages, out, None, placement)


def _restore_tree(runtime: Runtime, store: Store, timings: dict, lazy_pages: bool, out: dict | None,
                  listener, placement=None) -> tuple[int, str | None]:
    spec = runtime.server
    engine = process_engine(runtime.engine)
    t = time.monotonic()
    # The images are written out (verified) once per node, on tmpfs when there is
    # one, and reused by later restores of the same checkpoint: CRIU only reads them.
    with ThreadPoolExecutor(max_workers=1) as beside:  # written out while the inputs are
        checkpoint = beside.submit(ensure_tree, store.blobs, runtime.images_tree, images_root(spec.run_root))
        run_dir, env, _mounted = server.prepare(spec, store.blobs)  # mounts stay for the server
    ckpt, _ = checkpoint.result()
    server_log_path = run_dir / server.LOG_NAME
    server_log_path.touch()  # CRIU reopens the server's log by path
    images = ckpt / "images"
    work = Path(tempfile.mkdtemp(prefix="snapbuild-restore-"))
    lazy = None
    if lazy_pages:
        try:
            why_not = engine.lazy_unsupported()
        except SnapbuildError as e:  # `criu check` itself failed: restore without them
            why_not = e.message
        if out is not None:
            out["lazy_pages"] = f"not used: {why_not}" if why_not else "used"
        if why_not:
            log.warning("lazy pages not used (%s); restoring all memory before the server runs", why_not)
        lazy_pages = why_not is None
    thp = None if lazy_pages else _thp_fill(out)
    try:
        shm: list[Path] = []
        try:  # the tree's /dev/shm files, run folder files and socket folders, where CRIU expects them
            sockdirs.recreate(runtime.socket_dirs, spec.run_dir)
            shm = shmfiles.put_back(runtime.shm_files, ckpt / "shm")
            # left in place should the restore fail: the same files a warm-up (or cold boot) writes
            runfiles.put_back(runtime.run_files, ckpt / "run_files", run_dir)
        except SnapbuildError as e:
            shmfiles.remove(shm)
            raise _NoRestore(e.message) from None
        timings["materialize_s"] = round(time.monotonic() - t, 4)
        t = time.monotonic()
        try:
            if lazy_pages:
                pid, lazy = engine.restore_lazily(images, work)
            else:
                pid = engine.restore(images, work, thp_fill=thp is None)
        except SnapbuildError as e:
            shmfiles.remove(shm)
            raise _NoRestore(f"restore failed: {e.message}") from None
        timings["restore_s"] = round(time.monotonic() - t, 4)
    finally:
        if lazy is None:  # else its daemon works there until every page is in place
            shutil.rmtree(work, ignore_errors=True)
    ready, address, forwarder = spec.ready, None, None
    if listener is not None:  # reached through a forwarder into its network namespace
        from ..runtime.portfwd import spawn

        forwarder, port = spawn(listener, f"/proc/{pid}/ns/net", server.server_port(spec), watch=pid)
        ready, address = probes.pointed_at(spec.ready, port), f"127.0.0.1:{port}"
    try:
        _resume_gpu(runtime, timings, lambda: process.stop(pid), root=pid, placement=placement)
        # its run lines, as at the warm-up: with the server's environment, in its network
        shell = None if listener is None else _in_netns(pid, env)
        _after_restore(runtime, ready, timings, lambda: process.stop(pid), shell=shell, env=env)
        _wait_restored(ready, server_log_path, lambda: process.alive(pid), lambda: process.stop(pid), timings)
        if lazy is not None:  # before the check requests, which then see the memory complete
            _wait_pages(lazy, timings, lambda: process.stop(pid))
        _verify(runtime, ready, timings, lambda: process.stop(pid))
    except _NoRestore as e:
        if forwarder is not None:  # the port, free for the cold boot
            process.stop(forwarder)
        lost = lazy.failed() if lazy is not None else None
        if lost and not str(e).startswith(LOST_PAGES):  # the cause of what went wrong: pages that never came fault (SIGBUS) or read as zeros
            raise _NoRestore(f"{LOST_PAGES}: {lost} (then: {e})") from None
        raise
    except BaseException:  # anything else (Ctrl-C, a bug): no restored server or forwarder is left behind
        process.stop(pid)
        if forwarder is not None:
            process.stop(forwarder)
        raise
    finally:
        if lazy is not None:
            lazy.kill()
            shutil.rmtree(work, ignore_errors=True)
    return pid, address


LOST_PAGES = "the restored server's memory did not all arrive"


def _wait_pages(lazy, timings: dict, give_up) -> None:
    """Wait for the lazy-pages daemon to put every page in place (``pages_s``, from the
    end of the restore's own work). A daemon that failed leaves memory that was never
    sent: the server is stopped and the restore counts as failed."""
    from .. import tools

    t = time.monotonic()
    try:
        lazy.wait(timeout=tools.limit("criu"))
    except SnapbuildError as e:
        give_up()
        raise _NoRestore(f"{LOST_PAGES}: {e.message}") from None
    timings["pages_s"] = round(time.monotonic() - t, 4)


def _in_netns(pid: int, env: dict):
    """How a run line runs in the network namespace of the server ``pid``."""
    from ..tools import run_killing_group

    return lambda line, t: run_killing_group(["nsenter", f"--net=/proc/{pid}/ns/net", "bash", "-c", line],
                                             timeout=t, env=env)


def _after_restore(runtime: Runtime, ready: dict, timings: dict, give_up, shell=None, env: dict | None = None) -> None:
    """The checkpoint's `after_restore` calls (e.g. waking a server that slept for its
    checkpoint), made before the readiness probe: HTTP calls to the restored server (the
    schema allows no other), run lines through ``shell`` (a container's: inside it),
    else here with the server's ``env``."""
    items = [probes.on_base(i) for i in runtime.after_restore]
    if not items:
        return
    t = time.monotonic()
    try:
        probes.run_exercise(items, base=probes.base_url(ready), log=lambda _msg: None, timeout=120, shell=shell,
                            env=env)
    except probes.ProbeFailed as e:
        give_up()
        raise _NoRestore(f"after_restore failed: {e}") from None
    timings["after_restore_s"] = round(time.monotonic() - t, 4)


def _verify(runtime: Runtime, ready: dict, timings: dict, give_up) -> None:
    """Replay the checkpoint's check requests on the ready, restored server; an answer
    other than the warm-up's stops it (the caller boots cold, with the difference)."""
    if not runtime.verify:
        return
    t = time.monotonic()
    why = probes.check_answers([probes.on_base(i) for i in runtime.verify], base=probes.base_url(ready))
    timings["verify_s"] = round(time.monotonic() - t, 4)
    if why is not None:
        give_up()
        raise _Differs(f"{_Differs.PREFIX}: {why}")


def _resume_gpu(runtime: Runtime, timings: dict, give_up, prefix: list[str] | None = None, root: int | None = None,
                placement=None) -> None:
    """GPU state back on the GPU (the placement's) and CUDA unlocked, for a snapshot
    taken with gpu: cuda."""
    if not runtime.gpu:
        return
    from ..gpu.snapshot import resume

    t = time.monotonic()
    try:
        timings.update(resume(runtime.gpu, prefix=prefix, root=root,
                              device_map=placement.device_map if placement is not None else None))
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


def _cold(spec: ServerSpec, store: Store, timings: dict, host_port: int | None = None) -> tuple[int, str | None]:
    t = time.monotonic()
    started = server.start(spec, store.blobs, fresh_log=False, host_port=host_port)
    timings["materialize_s"] = round(timings.get("materialize_s", 0) + time.monotonic() - t, 4)
    t = time.monotonic()
    try:
        started.wait_ready(started.probe(spec.ready))
    except probes.ProbeFailed as e:
        started.stop()
        raise RestoreFailed(f"cold boot failed too: {e}\n{process.tail(started.log_path, 10)}") from None
    timings["ready_s"] = round(time.monotonic() - t, 4)
    return started.pid, f"127.0.0.1:{started.host_port}" if started.isolated else None


def _host_port(publish: str | None, spec: ServerSpec) -> int | None:
    addr = probes.address(spec.ready)
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


def _thp_fill(out: dict | None) -> str | None:
    """Whether this plain restore reads memory into huge pages: None when it does, else
    why not (said in the JSON's ``thp_fill``, logged at debug level: the default)."""
    try:
        why_not = criu.thp_fill_unused()
    except criu.CriuError as e:  # `criu --help` failed: the restore will say more
        why_not = e.message
    if out is not None:
        out["thp_fill"] = f"not used: {why_not}" if why_not else "used"
    if why_not:
        log.debug("restoring without huge pages: %s", why_not)
    return why_not


def _describe(out: dict, inst) -> None:
    out.update(pid=inst.pid, container=inst.id, log=str(inst.log_path),
               address=f"127.0.0.1:{inst.host_port}" if inst.host_port else None)


def _restore_container(runtime: Runtime, store: Store, timings: dict, host_port: int | None, placement=None,
                       out: dict | None = None):
    from ..runtime import container

    spec = runtime.server
    engine = container_engine(runtime.engine)
    t = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as beside:  # the checkpoint written out meanwhile
        checkpoint = beside.submit(ensure_tree, store.blobs, runtime.images_tree, images_root(spec.run_root))
        try:
            inst = container.prepare(spec, store.blobs, engine.name, host_port,
                                     gpus=placement.targets if placement is not None else None)
        except erofs.ImageUnusable:
            raise  # run() fetches the trees and writes them out instead
        except SnapbuildError as e:
            raise _NoRestore(f"cannot set up the container: {e.message}") from None
    try:
        ckpt, _ = checkpoint.result()
        if engine.name == "runc" and _thp_fill(out) is None:  # runc's CRIU reads the bundle's options
            container.criu_option(inst, "thp-fill")
        runfiles.put_back(runtime.run_files, ckpt / "run_files", Path(inst.run_dir))  # its compile cache, say
    except SnapbuildError as e:
        container.destroy(inst)
        raise _NoRestore(f"cannot set up the container: {e.message}") from None
    except BaseException:
        container.destroy(inst)
        raise
    work = Path(tempfile.mkdtemp(prefix="snapbuild-restore-"))
    try:
        timings["materialize_s"] = round(time.monotonic() - t, 4)
        t = time.monotonic()
        try:
            container.launch(inst, engine, lambda: engine.restore(Path(inst.bundle), inst.id, ckpt / "images", work,
                                                                  options=spec.engine_options))
        except SnapbuildError as e:
            raise _NoRestore(f"restore failed: {e.message}") from None
        timings["restore_s"] = round(time.monotonic() - t, 4)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if runtime.gpu and runtime.gpu.get("sandbox"):
        from ..gpu.snapshot import sandbox_prefix

        _resume_gpu(runtime, timings, lambda: container.destroy(inst), prefix=sandbox_prefix(engine, inst.id),
                    placement=placement)
    elif runtime.gpu:  # runc: the node's device nodes in place of the build machine's, then the state
        try:
            container.refresh_gpu_nodes(inst, runtime.gpu.get("device_nodes") or [])
        except SnapbuildError as e:
            container.destroy(inst)
            raise _NoRestore(f"the GPU state did not come back: {e.message}") from None
        _resume_gpu(runtime, timings, lambda: container.destroy(inst), root=inst.pid, placement=placement)
    # run lines inside the container (`runc exec`: its namespaces, root, capabilities), never here
    _after_restore(runtime, container.host_probe(spec, inst), timings, lambda: container.destroy(inst),
                   shell=lambda line, t: engine.exec(inst.id, ["/bin/sh", "-c", line], t))
    _wait_restored(container.host_probe(spec, inst), inst.log_path, lambda: container.alive(inst),
                   lambda: container.destroy(inst), timings)
    _verify(runtime, container.host_probe(spec, inst), timings, lambda: container.destroy(inst))
    return inst


def _cold_container(runtime: Runtime, store: Store, timings: dict, host_port: int | None,
                    gpus: list[str] | None = None):
    from ..runtime import container

    spec = runtime.server
    t = time.monotonic()
    inst = container.start(spec, store.blobs, container_engine(runtime.engine), host_port, gpus=gpus)
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


def server_log(ref: str, *, registry: str | None = None, lines: int = 50, store: Store | None = None) -> str:
    """The end of the server log of snapshot ``ref`` on this node."""
    from ..registry import locate

    ref, registry = locate(ref, registry)
    runtime = pull(ref, registry=registry, store=store or Store())["snapshot"].runtime
    if runtime is None:
        raise NotFound(f"snapshot {ref} holds no checkpoint: it has no server log")
    run_dir = Path(runtime.server.run_dir)
    path = run_dir / server.LOG_NAME
    if runtime.in_container:  # one run folder per container: the newest
        logs = sorted(run_dir.glob(f"*/{server.LOG_NAME}"), key=lambda p: p.stat().st_mtime)
        path = logs[-1] if logs else path
    if not path.exists():
        raise NotFound(f"no server log at {path}: this snapshot has not run on this node",
                       hint=f"start it with: snapbuild-runner restore {ref}")
    return process.tail(path, lines)


def stop(target: int | str) -> bool:
    """Stop a server by PID, or a container by its id or init PID: the container, its
    port forwarder, mounts and network namespace go too; a host server's `mounts:` go
    when no other server uses them. True if it was running."""
    from ..runtime import container
    from ..runtime.layout import DEFAULT_RUN_ROOT, run_root

    roots = list(dict.fromkeys([run_root(), Path(DEFAULT_RUN_ROOT)]))
    for root in roots:
        inst = container.find(root, str(target))
        if inst is not None:
            container.destroy(inst)
            return True
    if not str(target).isdigit():
        return False
    stopped = process.stop(int(target))
    for root in roots:  # its mounts, when no other server uses them
        mounts.release(root)
    return stopped
