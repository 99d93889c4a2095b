"""``checkpoint``: start the warm-up process, make it ready and warm, and dump it.

```yaml
snap: {kind: checkpoint, process: server, engine: host}
snap: {kind: checkpoint, process: server, gpu: cuda, cuda: {timeout: 900}}
snap: {kind: checkpoint, process: server, verify: [{http: "POST /infer", body: '{"x": 1}'}]}
```

With ``gpu: cuda`` the server's CUDA processes are locked and their GPU state moved
to host memory before the dump (snapbuild/gpu/), and the GPUs' fingerprint is recorded.

The artifact holds the engine's images under ``images/`` and ``checkpoint.json``:
the server spec (command, env, probe, inputs by digest) for restore and cold boot
alike, the machine fingerprint, sizes, and the answers to the ``verify`` requests (asked twice
once the server is ready, before the exercises, which may end with it asleep; the
runner replays them after each restore, after ``after_restore``). The key includes the engine fingerprint
(CPU, kernel, CRIU version): a checkpoint is only as portable as that.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engines import CONTAINER_ENGINES, container_engine, get_engine, process_engine
from ..errors import SnapbuildError, StepError
from ..runtime import probe as probes
from ..runtime import carriable, process, runfiles, server, shmfiles, sockdirs
from ..runtime.layout import run_dir, run_root
from ..schema import Runtime, ServerSpec, on_the_server, server_request_problem
from ..store.tree import build_tree, walk
from ..tools import OrphanGuard
from .base import BuildContext, PinContext, StepSpec
from .warmup import Exercise

MANIFEST = "checkpoint.json"
ANON_TIP_BYTES = 256 << 20  # above this, suggest mapping weights instead


class RunscOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    compression: Literal["none", "flate-best-speed"] = "none"
    direct: bool = False
    background: bool = False
    nvproxy: bool = False


class CudaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # tool: NVIDIA's cuda-checkpoint; driver: the driver API (r570+); auto: the tool if on PATH
    method: Literal["auto", "tool", "driver"] = "auto"
    lock_timeout: float = Field(default=60, gt=0)  # seconds for in-flight CUDA work to finish
    timeout: float = Field(default=600, gt=0)  # seconds to move GPU memory out or back (big models: minutes)


class Check(Exercise):
    """A check request: an HTTP exercise whose answer must not change. ``compare``:
    dotted paths into a JSON answer (``choices.0.logprobs``) to compare instead of the
    whole body, for answers that carry an id or a timestamp."""

    compare: list[str] | None = Field(default=None, min_length=1, max_length=32)


class CheckpointSpec(StepSpec):
    process: str
    engine: Literal["host", "runc", "runsc"] = "host"
    gpu: Literal["none", "cuda"] = "none"
    cuda: CudaOptions | None = None  # how GPU state is checkpointed (gpu: cuda)
    runsc: RunscOptions | None = None  # gVisor's own checkpoint and restore options
    # What the runner does to a restored server before probing it ready (not after a cold
    # boot): e.g. vLLM's `POST /wake_up` when the warm-up ended with `POST /sleep`.
    after_restore: list[Exercise] = Field(default_factory=list)
    # Check requests: answered at the warm-up (recorded) and by every restored server
    # before it is declared ready; a different answer stops it and boots cold instead.
    verify: list[Check] = Field(default_factory=list)
    # engine host: the server with the machine's PIDs and network (one at a time per node),
    # or in PID, network and IPC namespaces of its own (replicas side by side; runtime.nsinit)
    isolation: Literal["host", "namespaces"] = "host"
    # gpu: cuda with engine runc: how many of the build machine's GPUs (the first ones by
    # index) the warm-up container is given, from its CDI spec (1 when not set)
    gpus: int | None = Field(default=None, ge=1, le=64)
    # How CUDA state is moved changes nothing in the output: the options are not keyed.
    KEYLESS: ClassVar[frozenset[str]] = StepSpec.KEYLESS | {"cuda"}

    def key_fields(self) -> dict:
        out = super().key_fields()
        if self.isolation == "host":  # the keys of checkpoints from before the key existed
            del out["isolation"]
        if self.gpus is None:
            del out["gpus"]
        return out

    @model_validator(mode="after")
    def _options_match_engine(self):
        if self.runsc is not None and self.engine != "runsc":
            raise ValueError(f"`runsc:` options need engine: runsc (this checkpoint uses {self.engine})")
        if self.cuda is not None and self.gpu != "cuda":
            raise ValueError("`cuda:` options need gpu: cuda")
        for i, check in enumerate(self.verify):
            if check.http is None:
                raise ValueError(f"verify[{i}]: a check is an HTTP request (`http: METHOD PATH`), whose answer the "
                                 "runner compares; `run:` belongs in `exercise:`")
            if not on_the_server(check.http):
                raise ValueError(f"verify[{i}]: {check.http!r}: a check request goes to the server: give a path "
                                 "(`POST /infer`), which the runner asks on the server's probe address")
            if check.repeat != 1:
                raise ValueError(f"verify[{i}]: a check request is asked once per restore; drop `repeat:`")
        if self.isolation != "host" and self.engine != "host":
            raise ValueError(f"isolation: {self.isolation} is for engine host; a container has namespaces of its "
                             "own already")
        if self.gpus is not None and (self.gpu != "cuda" or self.engine != "runc"):
            raise ValueError("`gpus:` is for gpu: cuda with engine runc (a container is given that many GPUs); "
                             "a host process sees the machine's GPUs")
        return self

    def cuda_options(self) -> CudaOptions:
        return self.cuda or CudaOptions()


class CheckpointStep:
    name = "checkpoint"
    version = 4  # 2: the tree's /dev/shm files and socket folders travel with it; 3: its run folder's files; 4: a runc container's too
    Spec = CheckpointSpec
    ephemeral = False

    def references(self, spec: CheckpointSpec):
        return [(spec.process, ("process",))]

    def check_links(self, spec: CheckpointSpec, steps: dict) -> tuple[tuple, str, str] | None:
        """Engine and warm-up must agree: containers need an image, host processes none."""
        warm = steps[spec.process]
        image = getattr(warm.spec, "image", None)
        if spec.engine in CONTAINER_ENGINES and not image:
            return (("engine",), f"engine {spec.engine} runs the server in a container, but warm-up "
                    f"{spec.process!r} has no `image:`", f"add `image: STEP` (an image step) to {spec.process}, "
                    "or use engine: host")
        if spec.engine not in CONTAINER_ENGINES and image:
            return (("engine",), f"warm-up {spec.process!r} runs in image {image!r}, which needs a container "
                    f"engine, not {spec.engine}", "use engine: runc (or runsc)")
        if spec.isolation != "host" and warm.spec.ready.file is not None:
            return (("isolation",), f"isolation: {spec.isolation} reaches the server through a forwarded port, but "
                    f"warm-up {spec.process!r} is probed ready by a file", "give it an http or tcp ready probe")
        ready = warm.spec.ready.to_dict()
        for key, items in (("after_restore", spec.after_restore), ("verify", spec.verify)):
            for i, item in enumerate(items):
                why = server_request_problem(item.http, ready) if item.http is not None else None
                if why:
                    return ((key, i, "http"), why, "an HTTP call after a restore goes to the restored server: give "
                            "a path (`POST /wake_up`), and the warm-up an http or tcp ready probe")
        if image and steps[image].kind.name != "image":
            return (("process",), f"warm-up {spec.process!r}: `image: {image}` names a "
                    f"{steps[image].kind.name} step, not an image step", "point `image:` at a `kind: image` step")
        return None

    def pins(self, spec: CheckpointSpec, ctx: PinContext) -> dict:
        engine = get_engine(spec.engine)
        try:
            engine.check()
            fingerprint = engine.fingerprint()
        except SnapbuildError as e:
            raise StepError(e.message, hint=e.hint) from None
        if spec.gpu == "cuda":  # model, count, capability, driver: not which machine (no UUIDs)
            from ..gpu import fingerprint as gpu_fp

            fingerprint["gpu"] = gpu_fp.key_part(gpu_fp.node_gpus())
        return {"engine": spec.engine, "fingerprint": fingerprint}

    def build(self, spec: CheckpointSpec, ctx: BuildContext) -> str:
        recipe = ctx.recipe
        warm = recipe.steps[spec.process]  # a warmup step: the recipe loader checked
        wspec = warm.spec
        server_spec = ServerSpec(
            name=recipe.name,
            argv=wspec.argv(),
            env=dict(wspec.env),
            env_from_node=list(wspec.env_from_node),  # names only: the values stay on each machine
            cwd=wspec.cwd,
            ready=wspec.ready.to_dict(),
            run_root=str(run_root()),
            run_dir=str(run_dir(run_root(), recipe.name, ctx.input_keys[spec.process])),
            inputs={d: ctx.artifacts[d] for d in warm.deps if d != wspec.image},
            mounts=dict(wspec.mounts),
            io_uring=wspec.io_uring,
        )
        if spec.engine in CONTAINER_ENGINES:
            from ..runtime.container import read_image

            image = ctx.artifacts[wspec.image]
            server_spec = replace(server_spec, image=image, image_step=wspec.image,
                                  engine_options=_engine_options(spec),
                                  image_config=read_image(ctx.store.blobs, image)[0]["config"]["config"])
            return self._build_container(spec, ctx, server_spec, wspec)
        server_spec = replace(server_spec, isolation=spec.isolation)
        engine = process_engine(spec.engine)
        log = ctx.log
        say = lambda msg: (log.write(msg + "\n"), log.flush())  # noqa: E731
        scratch = ctx.store.scratch(f"ckpt-{ctx.name}")
        started = None
        guard: OrphanGuard | None = None
        try:
            t0 = time.monotonic()
            try:
                # killed with SIGKILL, the build takes its warm-up server with it (the next build needs the port)
                guard = OrphanGuard()
                started = server.start(server_spec, ctx.store.blobs, host_port=0, guard=guard)
            except FileNotFoundError as e:
                raise StepError(f"warmup {spec.process}: {e}", step=spec.process) from None
            except SnapbuildError as e:
                raise StepError(f"warmup {spec.process}: {e.message}", step=spec.process, hint=e.hint) from None
            say(f"started {server_spec.argv} as pid {started.pid}"
                + (f" in namespaces of its own, port published on 127.0.0.1:{started.host_port}"
                   if started.isolated else "") + f"; log {started.log_path}")
            ready = started.probe(server_spec.ready)
            try:
                ready_s = started.wait_ready(ready)
                say(f"ready after {ready_s:.2f}s ({probes.describe(ready)})")
                _refuse_uncarriable(process.tree(started.pid), server_spec, say)  # now, not after the exercises
                checks = probes.record_checks(_checks(spec), base=probes.base_url(ready), log=say)
                probes.run_exercise([e.model_dump(exclude_none=True) for e in wspec.exercise],
                                    base=probes.base_url(ready), log=say, env=started.env, shell=started.shell)
            except probes.ProbeFailed as e:
                raise _warmup_failed(spec, e, started.log_path) from None
            warm_s = time.monotonic() - t0
            pids = process.tree(started.pid)
            mem = process.memory(pids)
            images = scratch / "images"
            gpu = None
            t1 = time.monotonic()
            try:
                if spec.gpu == "cuda":
                    from ..gpu import snapshot as gpu_snapshot

                    gpu = gpu_snapshot.suspend_host(pids, spec.cuda_options(), say, pid_ns=started.isolated)
                tree = process.tree(started.pid)  # now: the tree may have grown since the warm-up
                pids = tree
                _refuse_escaped(tree)
                _refuse_uncarriable(tree, server_spec, say)
                held = shmfiles.held_inodes(tree)
                in_run = runfiles.held(tree, server_spec.run_dir)  # vLLM's torch.compile kernels, say
                socket_dirs = _socket_dirs(tree, server_spec)
                if started.isolated:
                    _refuse_shared_paths(held, socket_dirs)
                engine.dump(started.pid, images)
                shm = shmfiles.collect(held, scratch / "shm")
                run_files = runfiles.collect(in_run, Path(server_spec.run_dir), scratch / "run_files")
            except SnapbuildError as e:
                raise _dump_failed(e, ctx) from None
            except OSError as e:
                raise StepError(f"cannot keep the server's /dev/shm or run folder files with its checkpoint: {e}",
                                hint="check the free space of the store's disk") from None
            dump_s = time.monotonic() - t1
            started.wait_exit(timeout=10)
            process.wait_gone(tree, timeout=10)  # the dumped tree's PIDs free (reaped, if ours)
            (images / "dump.log").unlink(missing_ok=True)
            say(f"--- server log (last 40 lines of {started.log_path}) ---\n"
                + process.tail(started.log_path, 40).rstrip() + "\n---")
            pages = sum(p.stat().st_size for p in images.glob("pages-*.img"))
            say(f"dumped {len(pids)} process(es) in {dump_s:.2f}s: {pages / 2**20:.1f} MiB of memory pages")
            if shm:
                say(f"carried {len(shm)} file(s) the tree held in /dev/shm ({sum(f['size'] for f in shm)} bytes): "
                    + ", ".join(f["name"] for f in shm[:8]) + (" ..." if len(shm) > 8 else ""))
            _say_run_files(run_files, say)
            say(f"memory at the dump: {mem['anonymous_bytes'] / 2**20:.1f} MiB anonymous (in the checkpoint), "
                f"{mem['file_backed_bytes'] / 2**20:.1f} MiB file-backed (left out while unchanged)")
            if mem["anonymous_bytes"] > ANON_TIP_BYTES:
                say(f"tip: {mem['anonymous_bytes'] / 2**20:.0f} MiB of the checkpoint is anonymous memory; if it "
                    "holds model weights, memory-map them from a weights input (e.g. torch.load(mmap=True)) "
                    "to leave them out: smaller snapshots restore faster")
            stats = {"warm_s": round(warm_s, 3), "dump_s": round(dump_s, 3), "pages_bytes": pages, **mem}
            # in namespaces of its own, the PIDs are the namespace's: nothing on the node to wait for
            return _store(spec, ctx, scratch, server_spec, [] if started.isolated else pids, stats, gpu, shm,
                          socket_dirs, checks, run_files)
        finally:
            if started is not None:
                started.stop()  # no orphan server after success or failure
                server.unmount(started.mounted)
            if guard is not None:
                guard.release()
            shutil.rmtree(scratch, ignore_errors=True)

    def _build_container(self, spec: CheckpointSpec, ctx: BuildContext, server_spec: ServerSpec, wspec) -> str:
        from ..runtime import container

        engine = container_engine(spec.engine)
        say = lambda msg: (ctx.log.write(msg + "\n"), ctx.log.flush())  # noqa: E731
        scratch = ctx.store.scratch(f"ckpt-{ctx.name}")
        inst = None
        guard: OrphanGuard | None = None
        try:
            t0 = time.monotonic()
            gpus = _warmup_gpus(spec)
            try:
                inst = container.start(server_spec, ctx.store.blobs, engine, host_port=0, gpus=gpus)
            except SnapbuildError as e:
                raise StepError(f"warmup {spec.process}: {e.message}", step=spec.process, hint=e.hint) from None
            guard = OrphanGuard(inst.pid) if inst.pid else None  # see the process warm-up
            say(f"started container {inst.id} ({spec.engine}), init pid {inst.pid}; port {inst.container_port} "
                f"published on 127.0.0.1:{inst.host_port}; log {inst.log_path}")
            ready = container.host_probe(server_spec, inst)
            try:
                ready_s = probes.wait_ready(ready, log_path=inst.log_path, alive=lambda: container.alive(inst))
                say(f"ready after {ready_s:.2f}s ({probes.describe(ready)})")
                if spec.engine == "runc":  # runsc: a sandbox is gVisor's to checkpoint, no tree of CRIU's
                    _refuse_uncarriable(process.tree(inst.pid or 0), server_spec, say)
                checks = probes.record_checks(_checks(spec), base=probes.base_url(ready), log=say)
                probes.run_exercise([e.model_dump(exclude_none=True) for e in wspec.exercise],
                                    base=probes.base_url(ready), log=say,
                                    shell=lambda line, t: engine.exec(inst.id, ["/bin/sh", "-c", line], t))
            except probes.ProbeFailed as e:
                raise _warmup_failed(spec, e, inst.log_path) from None
            warm_s = time.monotonic() - t0
            mem = process.memory(process.tree(inst.pid))
            images = scratch / "images"
            gpu = None
            t1 = time.monotonic()
            try:
                if spec.gpu == "cuda":
                    from ..gpu import snapshot as gpu_snapshot

                    if spec.engine == "runsc":
                        gpu = gpu_snapshot.suspend_sandbox(engine, inst.id, spec.cuda_options(), say)
                    else:  # runc: the container's processes, seen from this machine
                        gpu = gpu_snapshot.suspend_host(process.tree(inst.pid or 0), spec.cuda_options(), say,
                                                        pid_ns=True)
                        gpu["device_nodes"] = container.gpu_edits(gpus or []).node_paths()
                in_run: set[str] = set()
                if spec.engine == "runc":
                    tree = process.tree(inst.pid or 0)
                    _refuse_uncarriable(tree, server_spec, say)
                    in_run = runfiles.held(tree, container.RUN)  # paths as the container sees them
                container.checkpoint(inst, engine, images, scratch / "work", server_spec.engine_options)
                run_files = runfiles.collect(in_run, Path(inst.run_dir), scratch / "run_files")
            except SnapbuildError as e:
                raise _dump_failed(e, ctx) from None
            except OSError as e:
                raise StepError(f"cannot keep the server's run folder files with its checkpoint: {e}",
                                hint="check the free space of the store's disk") from None
            dump_s = time.monotonic() - t1
            pages = sum(p.stat().st_size for p in images.glob("pages-*.img"))
            say(f"checkpointed in {dump_s:.2f}s: {pages / 2**20:.1f} MiB of memory pages")
            _say_run_files(run_files, say)
            say(f"--- server log (last 40 lines of {inst.log_path}) ---\n"
                + process.tail(inst.log_path, 40).rstrip() + "\n---")
            stats = {"warm_s": round(warm_s, 3), "dump_s": round(dump_s, 3), "pages_bytes": pages, **mem}
            # a container's PIDs are its own
            return _store(spec, ctx, scratch, server_spec, [], stats, gpu, checks=checks, run_files=run_files)
        finally:
            if inst is not None:
                container.destroy(inst)  # no container, mount, netns or forwarder left behind
            if guard is not None:
                guard.release()
            shutil.rmtree(scratch, ignore_errors=True)

    def snapshot_extras(self, store, artifact: str) -> tuple[Runtime, dict[str, str]]:
        """What a snapshot of this step carries besides the artifact itself: the runtime
        section of its config, and the input trees the server needs."""
        from ..store.tree import load_tree

        tree = load_tree(store.blobs, artifact)
        entry = next(e for e in tree["entries"] if e["path"] == MANIFEST)
        from ..store.chunks import read_file

        runtime = Runtime.from_json(json.loads(read_file(store.blobs, entry)), MANIFEST)
        trees = dict(runtime.server.inputs)
        if runtime.server.image is not None and runtime.server.image_step is not None:  # its image travels too
            trees[runtime.server.image_step] = runtime.server.image
        return runtime, trees


def _say_run_files(run_files: list[dict], say) -> None:
    if run_files:
        say(f"carried {len(run_files)} file(s) the tree held in its run folder "
            f"({sum(f['size'] for f in run_files)} bytes): "
            + ", ".join(f["path"] for f in run_files[:8]) + (" ..." if len(run_files) > 8 else ""))


def _refuse_escaped(tree: list[int]) -> None:
    """A process outside the tree (and its session) that holds one of the tree's own
    sockets is not in the checkpoint, and would keep the socket, a listening port say,
    on this machine: it is stopped, and the build says what escaped."""
    escaped = process.escaped_holders(tree)
    if not escaped:
        return
    pid, target = escaped[0]
    what = f"process {pid} ({process.command_line(pid)})"
    for p, _ in escaped:
        process.stop(p)
    more = f" (and {len(escaped) - 1} more)" if len(escaped) > 1 else ""
    raise StepError(f"{what}{more} holds the server's socket {process.socket_name(target)} but is outside its "
                    "process tree: it left the tree (a daemon that double-forked or called setsid), so a checkpoint "
                    "would leave it out while it kept the socket on this machine; it was stopped",
                    hint="keep every process of the server in its tree (no daemon mode: e.g. gunicorn without "
                         "--daemon), or have the helper close the descriptors it inherits")


def _refuse_uncarriable(tree: list[int], server_spec: ServerSpec, say) -> None:
    """Fail now, naming process, command line and fd, when the tree holds what CRIU
    cannot dump (runtime.carriable): not minutes later, at the end of a dump."""
    found = carriable.scan(tree)
    if not found:
        return
    for item in found:
        say(f"cannot be checkpointed: {item.describe()}")
    first = found[0]
    hint = carriable.HINTS[first.kind]
    if first.kind == "io_uring" and server_spec.io_uring == "allow":
        hint = f"{carriable.IO_URING_ALLOWED}; or {hint}"
    more = f" (and {len(found) - 1} more, listed in the step's log)" if len(found) > 1 else ""
    raise StepError(f"the server cannot be checkpointed: {first.describe()}{more}, which CRIU cannot dump",
                    hint=hint)


def _dump_failed(e: SnapbuildError, ctx: BuildContext) -> StepError:
    """A failed dump as the step's error, its CRIU log moved out of the scratch folder
    (removed on the way out) to beside the step's log, where the tip now points."""
    log, hint = getattr(e, "log", None), e.hint
    if log is not None:
        kept = ctx.store.log_path(ctx.key).with_suffix(".criu-dump.log")
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(log, kept)
            hint = (hint or "").replace(str(log), str(kept)) or f"full log: {kept}"
        except OSError:
            pass  # the tip names the log's old place; the message has its errors
    return StepError(e.message, hint=hint)


def _socket_dirs(tree: list[int], server_spec: ServerSpec) -> list[str]:
    """The folders of the tree's path-bound unix sockets, which a node makes before the
    restore; a socket elsewhere than a scratch folder is refused with what to change."""
    folders = sockdirs.bound_dirs(tree)
    bad = [f for f in folders if sockdirs.place(f, server_spec.run_dir) is None]
    if bad:
        raise StepError(f"the server listens on a unix socket in {bad[0]}, a folder a node may not have and "
                        "snapbuild makes only below " + ", ".join(sockdirs.SCRATCH) + " or the run folder",
                        hint="put the socket below /tmp (e.g. /tmp/NAME/) or $SNAPBUILD_RUN")
    return folders


def _refuse_shared_paths(held: dict, socket_dirs: list[str]) -> None:
    """A server in namespaces of its own still shares the node's paths: replicas would
    share its /dev/shm files and fight over its socket paths."""
    if held:
        raise StepError("isolation: namespaces: the server holds files in /dev/shm, which side-by-side replicas "
                        "would share (namespaces of its own give it its own PIDs, network and IPC, not its own "
                        "files)", hint="use isolation: host for this server, or a container engine (runc)")
    if socket_dirs:
        raise StepError("isolation: namespaces: the server binds unix sockets to paths (in "
                        f"{', '.join(socket_dirs)}), which side-by-side replicas would fight over",
                        hint="use abstract sockets (they are the namespace's own), isolation: host, or engine: runc")


def _warmup_failed(spec: CheckpointSpec, e: probes.ProbeFailed, log_path) -> StepError:
    hint = ("`verify:` in the checkpoint step lists the check requests" if str(e).startswith("verify ") else
            "the server's log is above; `ready:` sets the probe and its timeout")
    return StepError(f"warmup {spec.process}: {e}", step=spec.process, log_tail=process.tail(log_path), hint=hint)


def _checks(spec: CheckpointSpec) -> list[dict]:
    return [e.model_dump(exclude_none=True) for e in spec.verify]


def _warmup_gpus(spec: CheckpointSpec) -> list[str] | None:
    """The GPUs a runc warm-up container is given: the machine's first ``gpus``."""
    if spec.gpu != "cuda" or spec.engine != "runc":
        return None
    from ..gpu import fingerprint as gpu_fp

    node = gpu_fp.node_gpus()
    want = spec.gpus or 1
    if not node or len(node["uuids"]) < want:
        raise StepError(f"gpu: cuda in a runc container needs {want} NVIDIA GPU(s) on the build machine: "
                        + (gpu_fp.no_gpu_reason() if not node else f"it has {len(node['uuids'])}"),
                        hint="build GPU snapshots on a GPU node of the kind that will restore them")
    return node["uuids"][:want]


def _engine_options(spec: CheckpointSpec) -> dict:
    """The runtime's options from the recipe; gpu: cuda under gVisor needs its nvproxy."""
    options = spec.runsc.model_dump() if spec.runsc else {}
    if spec.gpu == "cuda":
        options["nvproxy"] = True
    return options


def _store(spec: CheckpointSpec, ctx: BuildContext, scratch, server_spec: ServerSpec, pids: list[int],
           stats: dict, gpu: dict | None = None, shm: list[dict] | None = None,
           socket_dirs: list[str] | None = None, checks: list[dict] | None = None,
           run_files: list[dict] | None = None) -> str:
    """``checkpoint.json``, the engine's images (in ``scratch/images``) and the tree's
    /dev/shm files (``scratch/shm``) and run folder files (``scratch/run_files``) as the
    artifact. The format is the oldest that has every field used (schema.RUNTIME_FORMAT)."""
    images = scratch / "images"
    manifest = Runtime(
        format=5 if run_files else 4 if server_spec.env_from_node else 3 if server_spec.isolation != "host" else
        2 if shm or socket_dirs or checks else 1, shm_files=shm or [], run_files=run_files or [],
        socket_dirs=socket_dirs or [], verify=checks or [],
        engine=spec.engine, process=spec.process, server=server_spec, pids=pids,
        fingerprint=ctx.pins["fingerprint"], gpu=gpu,
        after_restore=[e.model_dump(exclude_none=True) for e in spec.after_restore],
        stats={**stats, "images_bytes": sum(p.stat().st_size for p in images.iterdir())},
    ).to_json()
    (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    items = [(MANIFEST, scratch / MANIFEST), ("images", images)]
    items += [(f"images/{rel}", p) for rel, p in walk(images)]
    if shm:
        items += [("shm", scratch / "shm")] + [(f"shm/{f['name']}", scratch / "shm" / f["name"]) for f in shm]
    if run_files:
        items += [("run_files", scratch / "run_files")]
        items += [(f"run_files/{rel}", p) for rel, p in walk(scratch / "run_files")]
    digest, _ = build_tree(ctx.store.blobs, items)
    return digest
