"""What a CUDA checkpoint assumes about the node's GPUs, and what cannot be snapshotted.

A CUDA checkpoint holds the GPU memory of its processes in host memory; restoring
puts it back on GPUs of the same model, at least as many of them, with at least as
much memory, under the same driver version (NVIDIA's checkpoint support does not
restore across driver versions). GPU UUIDs differ from machine to machine: they are
recorded, not required.

``nvidia-smi`` answers every question here; it comes with the driver.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from ..engines.fingerprint import Mismatch
from ..tools import run_killing_group

QUERY = "index,name,uuid,compute_cap,memory.total,driver_version,mig.mode.current"


def parse_query(text: str) -> list[dict]:
    """Rows of ``nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 7:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        index, name, uuid, cc, mem, driver, mig = cells
        gpus.append({"index": int(index), "name": name, "uuid": uuid, "compute_capability": cc,
                     "memory_mib": int(float(mem)) if mem.replace(".", "").isdigit() else 0,
                     "driver": driver, "mig": mig == "Enabled"})
    return gpus


def parse_cuda_version(text: str) -> str | None:
    """The CUDA version the driver supports, from ``nvidia-smi`` (its banner or ``-q``)."""
    m = re.search(r"CUDA Version\s*:?\s*([\d.]+)", text)
    return m.group(1) if m else None


def from_smi(query_text: str, banner_text: str) -> dict | None:
    gpus = parse_query(query_text)
    if not gpus:
        return None
    return {
        "model": gpus[0]["name"],
        "count": len(gpus),
        "models": sorted({g["name"] for g in gpus}),
        "uuids": [g["uuid"] for g in gpus],
        "compute_capability": gpus[0]["compute_capability"],
        "memory_mib": min(g["memory_mib"] for g in gpus),
        "driver": gpus[0]["driver"],
        "cuda": parse_cuda_version(banner_text),
        "mig": [g["index"] for g in gpus if g["mig"]],
    }


def node_gpus(run=run_killing_group) -> dict | None:
    """This node's NVIDIA GPUs (see ``from_smi``), or None when it has none (no
    nvidia-smi, or no device it can see)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        q = run([smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"], capture_output=True, text=True,
                timeout=30)
        if q.returncode != 0:
            return None
        banner = run([smi], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return from_smi(q.stdout, banner.stdout)


def used_uuids(pids: list[int], order: list[str], run=run_killing_group) -> list[str]:
    """The GPUs (UUIDs, sorted as in ``order``: the node's, by index) that any of
    ``pids`` has a CUDA context on, from ``nvidia-smi --query-compute-apps``; empty
    when it cannot tell."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        r = run([smi, "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader,nounits"], capture_output=True,
                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    used = set()
    for line in r.stdout.splitlines() if r.returncode == 0 else []:
        pid, _, uuid = (c.strip() for c in line.partition(","))
        if pid.isdigit() and int(pid) in pids and uuid:
            used.add(uuid)
    return sorted(used, key=lambda u: order.index(u) if u in order else len(order))


def no_gpu_reason() -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi is not installed (no NVIDIA driver on this machine)"
    return "nvidia-smi sees no GPU"


def key_part(fp: dict | None) -> dict | None:
    """The part of a GPU fingerprint that goes into a checkpoint step's key: what makes
    a checkpoint restorable elsewhere, not which machine made it (no UUIDs)."""
    if not fp:
        return None
    return {k: fp.get(k) for k in ("model", "count", "compute_capability", "driver")}


def _major(version: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version or ""))


def compare(recorded: dict | None, node: dict | None) -> list[Mismatch]:
    """Why a CUDA checkpoint taken on ``recorded`` GPUs can (not) restore on ``node``."""
    if not recorded:
        return []  # no GPU state in the snapshot
    want = f"{recorded['count']}x {recorded['model']}"
    if not node:
        return [Mismatch("gpu", True, f"the snapshot holds GPU state of {want}, and this node has no NVIDIA GPU "
                                      f"({no_gpu_reason()})")]
    out: list[Mismatch] = []
    if recorded["model"] != node["model"]:
        out.append(Mismatch("gpu.model", True, f"different GPU: built on {recorded['model']}, this node has "
                                               f"{node['model']}"))
    elif recorded.get("compute_capability") != node.get("compute_capability"):
        out.append(Mismatch("gpu.compute_capability", True,
                            f"compute capability {recorded.get('compute_capability')} at build, "
                            f"{node.get('compute_capability')} here"))
    if node["count"] < recorded["count"]:
        out.append(Mismatch("gpu.count", True, f"the snapshot used {recorded['count']} GPU(s), this node has "
                                               f"{node['count']}"))
    elif node["count"] > recorded["count"]:
        out.append(Mismatch("gpu.count", False, f"this node has {node['count']} GPUs, the snapshot uses "
                                                f"{recorded['count']}"))
    if recorded.get("driver") != node.get("driver"):
        out.append(Mismatch("gpu.driver", True, f"NVIDIA driver {recorded.get('driver')} at build, "
                                                f"{node.get('driver')} here: CUDA checkpoints restore only "
                                                "under the driver version that made them"))
    if node.get("memory_mib", 0) < recorded.get("memory_mib", 0):
        out.append(Mismatch("gpu.memory", True, f"{node.get('memory_mib')} MiB per GPU here, "
                                                f"{recorded.get('memory_mib')} MiB at build"))
    if node.get("mig"):
        out.append(Mismatch("gpu.mig", True, f"MIG is enabled on GPU(s) {node['mig']}: CUDA checkpoints "
                                             "do not support MIG"))
    return out  # which of this node's GPUs take the state: placement.place


# --- what cannot be snapshotted -------------------------------------------------------------

def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def uses_cuda(pid: int) -> bool:
    """Whether the process has the CUDA driver library loaded."""
    return bool(re.search(r"/libcuda\.so(\.\d+)*\s*$", _maps(pid), re.M))


def cuda_processes(pids: list[int]) -> list[int]:
    return [p for p in pids if uses_cuda(p)]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _mps_server_running(proc: Path = Path("/proc")) -> bool:
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("nvidia-cuda-mps", "nvidia-cuda-mps-server"):
                    return True
            except OSError:
                continue
    return False


def unsupported(cuda_pids: list[int], gpus: dict | None, *, mps_running=_mps_server_running) -> list[str]:
    """Reasons this process tree cannot be CUDA-checkpointed, as far as can be told from
    outside: MIG, MPS, several processes sharing NCCL. (Managed memory, ``cudaMallocManaged``,
    is not supported by CUDA checkpoints either, and cannot be seen from outside.)"""
    out = []
    if gpus and gpus.get("mig"):
        out.append(f"MIG is enabled on GPU(s) {gpus['mig']}: CUDA checkpoints do not support MIG")
    if any("CUDA_MPS_PIPE_DIRECTORY" in _environ(p) for p in cuda_pids) or (cuda_pids and mps_running()):
        out.append("the CUDA MPS server is in use: CUDA checkpoints do not support MPS clients")
    nccl = [p for p in cuda_pids if re.search(r"/libnccl\.so", _maps(p))]
    if len(cuda_pids) > 1 and nccl:
        out.append(f"{len(cuda_pids)} processes use CUDA and {len(nccl)} of them NCCL (pids "
                   f"{', '.join(map(str, cuda_pids))}): a checkpoint of several processes talking NCCL "
                   "is not consistent; serve with one process (tensor parallelism in threads), or boot cold")
    return out

