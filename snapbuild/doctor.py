"""``snapbuild doctor``: which system parts are here, which version, and do they work."""

from __future__ import annotations

import re
import shutil
import subprocess


def _run(argv: list[str], timeout: float = 20) -> tuple[int, str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)


def _version(text: str) -> str | None:
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def check_criu() -> dict:
    from .engines import criu

    out = {"name": "criu", "needed_for": "process checkpoints (engines host, runc)"}
    try:
        path = criu.binary()
    except Exception as e:  # CriuError
        return {**out, "found": False, "works": False, "detail": str(e), "hint": criu.SETUP_HINT}
    rc, text = _run([path, "--version"])
    version = _version(text)
    rc, text = _run([path, "check"])
    # The rlimit complaint is harmless in sandboxes; the exit status decides.
    detail = "criu check passed" if rc == 0 else next(
        (ln for ln in text.splitlines() if "Error" in ln and "RLIMIT" not in ln), text[-200:])
    ok = rc == 0 and tuple(int(x) for x in (version or "0.0").split(".")[:2]) >= criu.MIN_VERSION
    if rc == 0 and not ok:
        detail = f"version {version} is older than 4.2"
    return {**out, "found": True, "path": path, "version": version, "works": ok, "detail": detail,
            "hint": None if ok else criu.SETUP_HINT}


def check_gpu() -> dict:
    from .gpu import fingerprint as gpu_fp

    out = {"name": "nvidia-gpu", "needed_for": "GPU checkpoints (gpu: cuda)"}
    gpus = gpu_fp.node_gpus()
    if not gpus:
        return {**out, "found": False, "works": False, "detail": gpu_fp.no_gpu_reason(),
                "hint": "only GPU nodes build and restore gpu: cuda snapshots"}
    detail = f"{gpus['count']}x {gpus['model']}, driver {gpus['driver']}, CUDA {gpus['cuda']}"
    if gpus["mig"]:
        detail += f"; MIG on GPU(s) {gpus['mig']} (not supported by CUDA checkpoints)"
    return {**out, "found": True, "path": shutil.which("nvidia-smi"), "version": gpus["driver"],
            "works": not gpus["mig"], "detail": detail, "hint": None if not gpus["mig"] else "disable MIG"}


def _simple(name: str, argv: list[str], needed_for: str, hint: str, probe: list[str] | None = None) -> dict:
    out = {"name": name, "needed_for": needed_for}
    if not shutil.which(argv[0]):
        return {**out, "found": False, "works": False, "detail": "not on PATH", "hint": hint}
    rc, text = _run(argv)
    works, detail = rc == 0, text.splitlines()[0] if text else ""
    if works and probe:
        prc, ptext = _run(probe)
        works = prc == 0
        detail = "running" if works else (ptext.splitlines()[-1] if ptext else "not responding")
    return {**out, "found": True, "path": shutil.which(argv[0]), "version": _version(text), "works": works,
            "detail": detail, "hint": None if works else hint}


def diagnose() -> list[dict]:
    return [
        check_criu(),
        _simple("runc", ["runc", "--version"], "container checkpoints (engine runc)", "apt-get install runc"),
        _simple("docker", ["docker", "--version"], "image steps built with the Docker engine",
                "apt-get install docker.io; start dockerd --bridge=none --iptables=false",
                probe=["docker", "info", "--format", "{{.ServerVersion}}"]),
        _simple("runsc", ["runsc", "--version"], "gVisor checkpoints (engine runsc)",
                "gVisor is not packaged for this machine; install runsc from gVisor's releases"),
        check_gpu(),
        _simple("cuda-checkpoint", ["cuda-checkpoint", "--help"], "GPU checkpoints (gpu: cuda, method tool)",
                "optional with driver r570+ (the driver API is used instead); else install NVIDIA's "
                "cuda-checkpoint"),
        _simple("skopeo", ["skopeo", "--version"], "checking OCI interoperability (tests)", "apt-get install skopeo"),
    ]
