"""The GPU device check (run by ci/gpu-check.sh on a machine with an NVIDIA GPU).

1. CUDA checkpointing of a live torch process, with each backend there is (the driver
   API through cuda-bindings or libcuda; cuda-checkpoint when on PATH): lock,
   checkpoint (GPU memory released), restore, unlock, and the same output before and
   after.
2. recipes/gpu/torch-cuda-mlp.yaml built (gpu: cuda, CRIU, isolation: namespaces),
   then cold boots and restores alternated (median of --runs), with the same output
   from every server.
3. Two replicas of that snapshot restored side by side on the machine's GPU (each in
   namespaces of its own, on its own published port), each answering with the cold
   boot's output.
4. The real vLLM: recipes/gpu/vllm-b200.yaml needs vLLM's CUDA build, which the GPU
   machines this is run on do not have (their image holds torch, not vLLM) and which
   cannot travel with the checkout (its wheels are ~400 MB, the carry limit 64 MiB,
   and the machine reaches no package index). The row says whether vLLM is importable
   there; the CPU build of the same layout is built, restored and compared on every CI
   run (tests/integration/test_vllm.py).

Prints a table; with --json FILE also writes the figures there. Exit status 0 when
every check passed, 1 when one failed, 2 when there is no GPU to check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import hashlib, sys, torch
torch.manual_seed(0)
layers = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(8)]).cuda().eval()
x = torch.randn(16, 4096, device="cuda")
def infer():
    with torch.inference_mode():
        y = layers(x); torch.cuda.synchronize()
        return hashlib.sha256(y.cpu().numpy().tobytes()).hexdigest()
print(infer(), flush=True)
for line in sys.stdin:
    print(infer(), flush=True)
"""

rows: list[tuple[str, str, str]] = []  # (check, result, detail)
failed = False


def row(check: str, ok: bool | None, detail: str) -> None:
    global failed
    failed |= ok is False
    rows.append((check, {True: "ok", False: "FAILED", None: "skipped"}[ok], detail))
    print(f"[gpu-check] {check}: {rows[-1][1]} {detail}", file=sys.stderr, flush=True)


def gpu_memory_of(pid: int) -> int | None:
    r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 2 and cells[0] == str(pid):
            return int(cells[1]) if cells[1].isdigit() else None
    return 0 if r.returncode == 0 else None


def live_process(backend_name: str, make_backend, figures: dict) -> None:
    from snapbuild.gpu import cuda

    check = f"live torch process, {backend_name}"
    try:
        be = make_backend()
    except Exception as e:  # noqa: BLE001 - report and go on
        row(check, None, f"backend unavailable: {e}")
        return
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        before = child.stdout.readline().strip()
        mem_before = gpu_memory_of(child.pid)
        t = {}

        def timed(step: str, timeout: float) -> None:
            t0 = time.monotonic()
            getattr(be, step)(child.pid, timeout)
            t[f"{step}_s"] = time.monotonic() - t0

        timed("lock", 60)
        timed("checkpoint", 300)
        state = be.state(child.pid)
        mem_ckpt = gpu_memory_of(child.pid)
        timed("restore", 300)
        timed("unlock", 60)
        child.stdin.write("infer\n")
        child.stdin.flush()
        after = child.stdout.readline().strip()
        figures[check] = {**{k: round(v, 3) for k, v in t.items()}, "state_after_checkpoint": state,
                          "gpu_mib_before": mem_before, "gpu_mib_checkpointed": mem_ckpt,
                          "same_output": before == after}
        ok = before == after and state == "checkpointed" and be.state(child.pid) == "running"
        row(check, ok, " ".join(f"{k}={v:.3f}" for k, v in t.items())
            + f" state={state} gpu_mib {mem_before}->{mem_ckpt}->back; outputs {'identical' if before == after else 'DIFFER'}")
    except cuda.CudaCheckpointError as e:
        row(check, False, e.message)
    finally:
        child.kill()
        child.wait()


def post(port: int, path: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def full_snapshot(runs: int, figures: dict) -> None:
    from snapbuild.build import build
    from snapbuild.engines import criu
    from snapbuild.errors import SnapbuildError
    from snapbuild.runner.restore import run, stop
    from snapbuild.store import Store

    try:
        criu.check_version()
        r = subprocess.run([criu.binary(), "check"], capture_output=True, text=True)
        if r.returncode != 0:
            row("CRIU", False, f"`criu check` fails here: {(r.stdout + r.stderr).strip()[-300:]}")
            return
        row("CRIU", True, f"criu {criu.version()} at {criu.binary()}")
    except SnapbuildError as e:
        row("CRIU", False, e.message)
        return
    store = Store(Path(tempfile.mkdtemp(prefix="gpu-check-home-")))
    t0 = time.monotonic()
    [res] = build(REPO / "recipes/gpu/torch-cuda-mlp.yaml", store=store,
                  sets={"python": sys.executable, "isolation": "namespaces"})
    build_s = time.monotonic() - t0
    if not res.ok:
        bad = {n: (r.error, r.log_tail) for n, r in res.steps.items() if r.error}
        row("build torch-cuda-mlp (gpu: cuda)", False, json.dumps(bad)[-1500:])
        return
    steps = {n: round(r.duration_s, 2) for n, r in res.steps.items() if getattr(r, "duration_s", None)}
    row("build torch-cuda-mlp (gpu: cuda)", True, f"{build_s:.1f}s; steps {steps}")
    figures["build"] = {"total_s": round(build_s, 2), "steps": steps}
    times: dict[str, list[float]] = {"cold": [], "restore": []}
    answers, phases = set(), []
    for i in range(runs):
        for mode in ("cold", "restore"):
            out = run("torch-cuda-mlp:dev", store=store, mode=mode, publish="0")
            try:
                answers.add(post(port_of(out), "/infer")["digest"])
            finally:
                stop(out["pid"])
            if out["mode"] != mode:
                row(f"{mode} run {i + 1}", False, f"fell back: {out['reason']}")
                return
            times[mode].append(out["timings"]["total_s"])
            if mode == "restore":
                phases.append(out["timings"])
    med = {k: statistics.median(v) for k, v in times.items()}
    figures["start"] = {"runs": runs, "cold_s": times["cold"], "restore_s": times["restore"],
                        "median_cold_s": med["cold"], "median_restore_s": med["restore"],
                        "ratio": round(med["cold"] / med["restore"], 2), "restore_phases": phases,
                        "identical_outputs": len(answers) == 1}
    row("cold boot to ready (median)", True, f"{med['cold']:.2f}s over {runs} runs")
    row("restore to ready (median)", True, f"{med['restore']:.2f}s over {runs} runs; phases of the last: "
        + ", ".join(f"{k}={v}" for k, v in phases[-1].items()))
    row("restore vs cold", med["restore"] < med["cold"], f"{med['cold'] / med['restore']:.1f}x faster")
    row("outputs identical (cold and restored servers)", len(answers) == 1, f"{len(answers)} distinct digest(s)")
    side_by_side(store, next(iter(answers)), figures)


def port_of(out: dict) -> int:
    return int(out["address"].rsplit(":", 1)[1])


def side_by_side(store, cold_digest: str, figures: dict, replicas: int = 2) -> None:
    """``replicas`` restores of the snapshot at once, all on GPU 0 (one GPU here)."""
    from snapbuild.runner.restore import run, stop

    started: list[dict] = []
    try:
        for _ in range(replicas):
            started.append(run("torch-cuda-mlp:dev", store=store, publish="0", gpus=["0"]))
        modes = [s["mode"] for s in started]
        digests = [post(port_of(s), "/infer")["digest"] for s in started]
    except Exception as e:  # noqa: BLE001 - report and go on
        row(f"{replicas} replicas side by side", False, f"{type(e).__name__}: {e}")
        return
    finally:
        for s in started:
            stop(s["pid"])
    ok = modes == ["restore"] * replicas and all(d == cold_digest for d in digests)
    totals = [s["timings"]["total_s"] for s in started]
    figures["side_by_side"] = {"modes": modes, "total_s": totals, "same_as_cold": [d == cold_digest for d in digests],
                               "reasons": [s.get("reason") for s in started]}
    row(f"{replicas} replicas side by side on GPU 0", ok,
        f"modes {modes}; restore totals {', '.join(f'{t:.2f}s' for t in totals)}; "
        f"outputs {'all the cold boot' + chr(39) + 's' if ok else str(digests)}"
        + "".join(f"; why not restored: {s['reason']}" for s in started if s.get("reason")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from snapbuild.gpu import cuda
    from snapbuild.gpu import fingerprint as gpu_fp

    gpus = gpu_fp.node_gpus()
    if not gpus:
        print(f"gpu-check: no NVIDIA GPU here ({gpu_fp.no_gpu_reason()}); nothing to check", file=sys.stderr)
        return 2
    figures: dict = {"gpus": gpus, "kernel": os.uname().release, "python": sys.version.split()[0]}
    try:
        import torch
    except ImportError:
        print(f"gpu-check: {sys.executable} has no torch: set PYTHON to the python3 with a CUDA build of torch",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"gpu-check: torch {torch.__version__} sees no CUDA device; nothing to check", file=sys.stderr)
        return 2
    figures["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
    row("node", True, f"{gpus['count']}x {gpus['model']}, driver {gpus['driver']}, CUDA {gpus['cuda']}, "
        f"kernel {figures['kernel']}, torch {figures['torch']}")
    live_process("driver API", lambda: cuda.DriverBackend(), figures)
    if subprocess.run(["sh", "-c", "command -v cuda-checkpoint"], capture_output=True).returncode == 0:
        live_process("cuda-checkpoint", lambda: cuda.ToolBackend(), figures)
    else:
        row("live torch process, cuda-checkpoint", None, "cuda-checkpoint is not on PATH")
    full_snapshot(a.runs, figures)
    vllm = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                          text=True, timeout=300)
    figures["vllm"] = vllm.stdout.strip() or None
    row("the real vLLM (recipes/gpu/vllm-b200.yaml)", None,
        f"vLLM {figures['vllm']} is importable here, but the recipe's weights come from the Hub, which this "
        "machine cannot reach" if vllm.returncode == 0 else
        "vLLM's CUDA build is not installed here and cannot travel (~400 MB of wheels, no package index)")
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  result   detail")
    for check, result, detail in rows:
        print(f"{check:<{width}}  {result:<7}  {detail}")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "figures": figures}, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
