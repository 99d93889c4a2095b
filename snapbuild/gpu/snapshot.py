"""``gpu: cuda`` in a checkpoint and a restore: which processes, which backend, what is
recorded. The checkpoint step and the runner call these; see cuda.py for the steps.

Recorded in ``checkpoint.json`` as ``gpu``::

    {"method": "tool", "pids": [4242], "fingerprint": {...}, "timeout_s": 600,
     "timings": {"lock_s": 0.01, "checkpoint_s": 2.3}, "sandbox": false,
     "uuids": ["GPU-..."], "pid_ns": false, "device_nodes": []}

``uuids``: the GPUs the processes used (placement.py maps them onto a node's). Host
processes keep their PIDs through CRIU, so ``pids`` names them at restore too; in
namespaces of their own or a runc container (``pid_ns``) they are the namespace's PIDs,
found again on the node below the restored tree's root; inside gVisor they are the
sandbox's own, and cuda-checkpoint runs there through ``runsc exec``.
``device_nodes``: a runc container's GPU device nodes at the checkpoint (its /dev
travels with it; the node's own replace them, runtime.cdi.refresh_nodes).
"""

from __future__ import annotations

import re

from ..errors import SnapbuildError
from ..runtime import process
from . import cuda
from . import fingerprint as gpu_fp


class GpuSnapshotError(SnapbuildError):
    exit_code = 8


def _node_gpus_or_fail() -> dict:
    gpus = gpu_fp.node_gpus()
    if not gpus:
        raise GpuSnapshotError(f"gpu: cuda needs an NVIDIA GPU on the build machine: {gpu_fp.no_gpu_reason()}",
                               hint="build GPU snapshots on a GPU node of the kind that will restore them")
    return gpus


def _check(pids: list[int], gpus: dict, what: str) -> None:
    if not pids:
        raise GpuSnapshotError(f"gpu: cuda, but no process of {what} has the CUDA driver (libcuda) loaded",
                               hint="make the warm-up put the model on the GPU before the checkpoint, "
                                    "or drop `gpu: cuda`")
    problems = gpu_fp.unsupported(pids, gpus)
    if problems:
        raise GpuSnapshotError(f"{what} cannot be CUDA-checkpointed: " + "; ".join(problems))


def suspend_host(pids: list[int], opts, say, *, pid_ns: bool = False) -> dict:
    """Before ``criu dump``: lock and checkpoint the CUDA processes among ``pids`` (this
    machine's PIDs; recorded as their namespace's when ``pid_ns``)."""
    gpus = _node_gpus_or_fail()
    cuda_pids = gpu_fp.cuda_processes(pids)
    _check(cuda_pids, gpus, "the server")
    used = gpu_fp.used_uuids(cuda_pids, gpus["uuids"])  # before the lock: a checkpointed process holds no GPU
    recorded = [process.ns_pid(p) or p for p in cuda_pids] if pid_ns else cuda_pids
    be = cuda.backend(opts.method)
    say(f"CUDA: {len(cuda_pids)} process(es) {cuda_pids} on {gpus['count']}x {gpus['model']} "
        f"(driver {gpus['driver']}); locking and checkpointing GPU state with the {be.name} backend")
    if not used:
        say(f"CUDA: nvidia-smi did not say which GPUs the processes use; recording all {gpus['count']} of this "
            "machine's, so a node restores it onto as many")
    timings = cuda.suspend(be, cuda_pids, lock_timeout_s=opts.lock_timeout, timeout_s=opts.timeout)
    say(f"CUDA: GPU state moved to host memory (lock {timings['lock_s']:.2f}s, checkpoint "
        f"{timings['checkpoint_s']:.2f}s)")
    return {"method": be.name, "pids": recorded, "fingerprint": gpus, "timeout_s": opts.timeout,
            "timings": timings, "sandbox": False, "uuids": used or gpus["uuids"], "pid_ns": pid_ns}


def sandbox_prefix(engine, cid: str) -> list[str]:
    """How to run a command inside a gVisor sandbox: ``runsc [flags] exec CID``."""
    return [engine.path(), *engine.global_flags, *engine.option_flags({"nvproxy": True}), "exec", cid]


def sandbox_cuda_pids(prefix: list[str], run) -> list[int]:
    """Sandbox PIDs whose memory maps hold libcuda (asked inside the sandbox)."""
    r = run([*prefix, "/bin/sh", "-c", "grep -l 'libcuda\\.so' /proc/[0-9]*/maps 2>/dev/null; true"],
            capture_output=True, text=True, timeout=60)
    return sorted({int(m) for m in re.findall(r"/proc/(\d+)/maps", r.stdout)})


def suspend_sandbox(engine, cid: str, opts, say, run=None) -> dict:
    """Before ``runsc checkpoint``: the same, with cuda-checkpoint inside the sandbox
    (gVisor's nvproxy gives the sandbox the GPU; the tool must be in the image)."""
    from ..tools import run_killing_group

    run = run or run_killing_group
    gpus = _node_gpus_or_fail()
    prefix = sandbox_prefix(engine, cid)
    pids = sandbox_cuda_pids(prefix, run)
    _check(pids, gpus, f"container {cid}")
    be = cuda.ToolBackend(prefix=prefix, run=run)
    say(f"CUDA: sandbox process(es) {pids} on {gpus['count']}x {gpus['model']}; cuda-checkpoint through runsc exec")
    timings = cuda.suspend(be, pids, lock_timeout_s=opts.lock_timeout, timeout_s=opts.timeout)
    return {"method": "tool", "pids": pids, "fingerprint": gpus, "timeout_s": opts.timeout,
            "timings": timings, "sandbox": True}


def resume(gpu: dict, *, prefix: list[str] | None = None, run=None, root: int | None = None,
           device_map: dict[str, str] | None = None) -> dict:
    """After a restore: GPU state back (onto other GPUs with ``device_map``) and
    unlocked, for the recorded processes; ``root``: the restored tree's root on this
    machine, below which namespace PIDs are looked up."""
    pids = list(gpu["pids"])
    if root is not None:  # never a process outside the restored tree, which has PIDs of its own
        pids = process.host_pids(root, pids)
        if len(pids) != len(gpu["pids"]):
            raise GpuSnapshotError(f"the restored tree below pid {root} lacks some of the CUDA processes "
                                   f"{gpu['pids']} of the checkpoint")
    if gpu.get("sandbox"):
        be = cuda.ToolBackend(prefix=prefix, run=run) if run else cuda.ToolBackend(prefix=prefix)
    else:  # the node's own way: the tool when it has it, unless the recipe asked for the driver API
        be = cuda.backend("driver" if gpu.get("method") == "driver" else "auto")
    return cuda.resume(be, pids, timeout_s=gpu.get("timeout_s", 600), device_map=device_map)


def mismatches(gpu: dict | None, node: dict | None = None) -> list:
    """This node (``node``: its GPUs as read already, else read now) against the GPUs a
    snapshot's CUDA state was taken on: as many as its processes used (``uuids``), not
    as many as the build machine had."""
    if not gpu:
        return []
    recorded = dict(gpu["fingerprint"])
    if gpu.get("uuids"):
        recorded["count"] = len(gpu["uuids"])
    return gpu_fp.compare(recorded, node if node is not None else gpu_fp.node_gpus())
