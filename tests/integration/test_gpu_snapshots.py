"""gpu: cuda end to end. This machine has no NVIDIA GPU, so the NVIDIA parts are
stand-ins (tests/integration/fakenvidia.py: nvidia-smi, and a cuda-checkpoint that keeps
each process's CUDA state and refuses wrong transitions, as the real one does); the
build, CRIU, the restore and the runner's checks are real. The last test needs a real
GPU and skips with "no NVIDIA GPU" where there is none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fakenvidia
from snapbuild.build import build
from snapbuild.gpu import fingerprint as gpu_fp
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import process
from snapbuild.store.snapshot import load_config, parse_manifest

from testkit import free_port, post

pytestmark = pytest.mark.integration

COUNTER = Path(__file__).parent / "data" / "counter_server.py"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def nvidia(tmp_path, monkeypatch):
    """A GPU node, as far as snapbuild can tell: (fake folder, fake libcuda.so.1)."""
    folder = tmp_path / "nvidia"
    bin_dir = fakenvidia.install(folder)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return folder, fakenvidia.fake_libcuda(folder)


def gpu_recipe(recipe, port: int, lib: Path | None, options: str = "", gpu: str = "cuda") -> Path:
    maps = f"--weights {lib}" if lib else ""
    path = recipe(f"""
        name: gpu
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            run: "{sys.executable} $SNAPBUILD_INPUTS/app/counter_server.py --port {port} {maps}"
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
            exercise: [{{http: "POST /count", repeat: 2}}]
          snap: {{kind: checkpoint, process: server, gpu: {gpu}{options}}}
        publish: {{tag: "gpu:v1"}}
    """)
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(COUNTER, path.parent / "app" / "counter_server.py")
    return path


def built(recipe, store, port, lib, options=""):
    [res] = build(gpu_recipe(recipe, port, lib, options), store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    manifest = parse_manifest(store.blobs.get(res.snapshot), res.snapshot)
    return load_config(store.blobs, manifest)["runtime"]


def test_gpu_state_is_checkpointed_before_the_dump_and_brought_back_after_restore(nvidia, recipe, store):
    folder, lib = nvidia
    port = free_port()
    runtime = built(recipe, store, port, lib)
    gpu = runtime["gpu"]
    [pid] = gpu["pids"]
    assert gpu["method"] == "tool" and gpu["fingerprint"]["model"] == "NVIDIA H200" and not gpu["sandbox"]
    assert gpu["fingerprint"]["uuids"] == ["GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000001"]
    assert runtime["fingerprint"]["gpu"] == {"model": "NVIDIA H200", "count": 1, "compute_capability": "9.0",
                                             "driver": "570.86.15"}, "the key holds the GPU kind, not its UUID"
    assert fakenvidia.calls(folder) == [f"--action lock --pid {pid} --timeout 60000",
                                        f"--action checkpoint --pid {pid}", f"--get-state --pid {pid}"]

    out = run("gpu:v1", store=store)
    try:
        assert out["mode"] == "restore", out
        now = out["pid"]  # the same process, restored in a PID namespace of its own: this machine's number
        assert process.ns_pid(now) == pid != now
        assert fakenvidia.calls(folder)[3:] == [f"--get-state --pid {now}", f"--action restore --pid {now}",
                                                f"--action unlock --pid {now}", f"--get-state --pid {now}"]
        assert (folder / f"state-{now}").read_text() == "running" and "gpu_s" in out["timings"]
        assert post(port, "/count")["count"] == 3
    finally:
        stop(out["pid"])


def test_a_node_with_other_gpus_or_none_boots_cold_and_says_why(nvidia, recipe, store, monkeypatch):
    folder, lib = nvidia
    port = free_port()
    built(recipe, store, port, lib)
    (folder / "gpus.csv").write_text(fakenvidia.B200)
    out = run("gpu:v1", store=store)
    stop(out["pid"])
    assert out["mode"] == "cold" and "different GPU: built on NVIDIA H200, this node has NVIDIA B200" in out["reason"]
    assert [m["field"] for m in out["mismatches"] if m["fatal"]] == ["gpu.model"]
    (folder / "gpus.csv").write_text(fakenvidia.H200.replace("570.86.15", "575.51.03"))
    out = run("gpu:v1", store=store)
    stop(out["pid"])
    assert out["mode"] == "cold" and "NVIDIA driver 570.86.15 at build, 575.51.03 here" in out["reason"]
    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])  # the fakes gone: no GPU
    out = run("gpu:v1", store=store)
    stop(out["pid"])
    assert out["mode"] == "cold" and "this node has no NVIDIA GPU" in out["reason"], out


def test_gpu_state_that_does_not_come_back_means_a_cold_boot(nvidia, recipe, store):
    folder, lib = nvidia
    port = free_port()
    built(recipe, store, port, lib)
    (folder / "fail-restore").touch()
    out = run("gpu:v1", store=store)
    try:
        assert out["mode"] == "cold" and "the GPU state did not come back" in out["reason"], out
        assert "restore failed (injected)" in out["reason"]
        assert post(port, "/count")["count"] == 1, "a cold server, on the port the restored one gave up"
    finally:
        stop(out["pid"])


def test_a_failed_gpu_checkpoint_fails_the_build_and_leaves_the_gpu_as_it_was(nvidia, recipe, store):
    folder, lib = nvidia
    (folder / "fail-checkpoint").touch()
    [res] = build(gpu_recipe(recipe, free_port(), lib, ", cuda: {lock_timeout: 5}"), store=store)
    assert not res.ok and "CUDA checkpoint of pid" in res.steps["snap"].error and "injected" in res.steps["snap"].error
    calls = fakenvidia.calls(folder)
    assert calls[0].endswith("--timeout 5000") and calls[-1].startswith("--action unlock"), \
        "the locked process is unlocked again"


def test_gpu_cuda_refuses_a_server_without_cuda_and_a_machine_without_gpu(nvidia, recipe, store, monkeypatch):
    [res] = build(gpu_recipe(recipe, free_port(), None), store=store)
    assert not res.ok and "no process of the server has the CUDA driver (libcuda) loaded" in res.steps["snap"].error
    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
    if gpu_fp.node_gpus() is not None:
        pytest.skip("this machine has a real NVIDIA GPU")
    [res] = build(gpu_recipe(recipe, free_port(), nvidia[1]), store=store)
    assert not res.ok and "gpu: cuda needs an NVIDIA GPU on the build machine" in res.steps["snap"].error


def test_after_restore_calls_run_on_a_restored_server_only(recipe, store):
    """What vllm-b200 uses to wake its server: calls made after a restore, before ready."""
    port = free_port()
    path = gpu_recipe(recipe, port, None, ', after_restore: [{http: "POST /count"}]', gpu="none")
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    out = run("gpu:v1", store=store)
    try:
        assert out["mode"] == "restore" and "after_restore_s" in out["timings"]
        assert post(port, "/count")["count"] == 4, "2 warm-up calls, then after_restore's, then this one"
    finally:
        stop(out["pid"])
    cold = run("gpu:v1", store=store, mode="cold")
    try:
        assert post(port, "/count")["count"] == 1, "a cold boot is not 'restored': no after_restore"
    finally:
        stop(cold["pid"])
    [res] = build(gpu_recipe(recipe, port, None, ', after_restore: [{http: "POST /count", expect: 201}]',
                             gpu="none"), store=store)
    out = run("gpu:v1", store=store)
    stop(out["pid"])
    assert out["mode"] == "cold" and "after_restore failed" in out["reason"] and "expected 201" in out["reason"]


def _real_gpu() -> bool:
    return gpu_fp.node_gpus() is not None


@pytest.mark.skipif(not _real_gpu(), reason="no NVIDIA GPU")
def test_torch_cuda_mlp_restores_with_identical_outputs(store, run_cli, home):
    """On a GPU node: the real recipe, the real driver, outputs identical after restore."""
    python = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                            capture_output=True, text=True).stdout.strip()
    if python != "True":
        pytest.skip("no NVIDIA GPU usable by torch here")
    r = run_cli("build", REPO / "recipes/gpu/torch-cuda-mlp.yaml", "--set", f"python={sys.executable}", timeout=1800)
    assert r.code == 0, r.err
    cold = run("torch-cuda-mlp:dev", store=store, mode="cold")
    try:
        want = post(8720, "/infer")["digest"]
    finally:
        stop(cold["pid"])
    out = run("torch-cuda-mlp:dev", store=store)
    try:
        assert out["mode"] == "restore", out
        assert post(8720, "/infer")["digest"] == want
    finally:
        stop(out["pid"])


def test_the_gpu_example_recipes_validate_and_plan_here(store, monkeypatch):
    """They need a GPU to build; loading, templating, checking and planning work anywhere.
    vllm-b200's weights come from the Hub, which is unreachable here: FakeHub stands in."""
    from fakehub import FakeHub

    from snapbuild.build import plan

    [p] = plan(REPO / "recipes/gpu/torch-cuda-mlp.yaml", store=store)
    snap = p.steps["snap"].material
    assert snap["spec"]["gpu"] == "cuda" and "cuda" not in snap["spec"] and p.steps["snap"].action == "run"
    hub = FakeHub()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        commit = hub.publish("Qwen/Qwen2.5-7B-Instruct", {"model-00001-of-00001.safetensors": b"\0" * 1000,
                                                          "config.json": b"{}", "tokenizer.json": b"{}",
                                                          "README.md": b"not selected"})
        [p] = plan(REPO / "recipes/gpu/vllm-b200.yaml", store=store)
    finally:
        hub.close()
    assert p.steps["weights"].material["pins"]["commit"] == commit, "the Hub revision is pinned to a commit"
    assert sorted(p.steps["weights"].material["pins"]["files"]) == ["config.json", "model-00001-of-00001.safetensors",
                                                                    "tokenizer.json"]
    snap = p.steps["snap"].material["spec"]
    assert snap["gpu"] == "cuda" and snap["after_restore"] == [{"http": "POST /wake_up", "headers": {}, "repeat": 1,
                                                                 "body": None, "expect": None, "run": None}]
    [check] = snap["verify"]
    assert check["compare"][0] == "choices.0.token_ids" and '"return_token_ids": true' in check["body"]
    assert '"temperature": 0' in check["body"]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in p.steps["server"].material["spec"]["env"], \
        "vLLM's default process layout, as the CPU example restores it"


def test_the_device_check_script_says_when_there_is_nothing_to_check(tmp_path):
    """ci/gpu-check.sh runs on GPU machines; here it must stop early and say why."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not Path(p, "nvidia-smi").exists())
    r = subprocess.run(["bash", str(REPO / "ci/gpu-check.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "no NVIDIA GPU here" in r.stderr, r.stderr
    env["PATH"] = f"{fakenvidia.install(tmp_path / 'nvidia')}:{env['PATH']}"
    env["PYTHON"] = sys.executable  # has snapbuild's dependencies; torch, if any, sees no GPU here
    r = subprocess.run(["bash", str(REPO / "ci/gpu-check.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and ("has no torch" in r.stderr or "sees no CUDA device" in r.stderr), r.stderr


def test_doctor_reports_the_gpus(nvidia, run_cli):
    folder, _ = nvidia
    [gpu] = [c for c in run_cli("doctor", "--json").json()["checks"] if c["name"] == "nvidia-gpu"]
    assert gpu["works"] and gpu["detail"] == "1x NVIDIA H200, driver 570.86.15, CUDA 12.8"
    (folder / "gpus.csv").write_text(fakenvidia.H200.replace("Disabled", "Enabled"))
    [gpu] = [c for c in run_cli("doctor", "--json").json()["checks"] if c["name"] == "nvidia-gpu"]
    assert not gpu["works"] and "MIG" in gpu["detail"]


def test_every_cuda_process_of_a_tree_is_locked_checkpointed_and_restored_in_the_drivers_order(nvidia, recipe,
                                                                                               store):
    """A server and a helper it forked, both CUDA processes (they map the stand-in
    libcuda): all are locked before any is checkpointed, and all get their GPU state
    back before any is unlocked; the stand-in refuses any other order, as processes
    sharing GPU memory need."""
    folder, lib = nvidia
    port = free_port()
    path = recipe(f"""
        name: gputree
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            command: ["{sys.executable}", "$SNAPBUILD_INPUTS/app/fork_server.py", --port, "{port}", --map, "{lib}"]
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
            exercise: [{{http: "POST /infer"}}]
          snap: {{kind: checkpoint, process: server, gpu: cuda}}
        publish: {{tag: "gputree:v1"}}
    """)
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(Path(__file__).parent / "data" / "fork_server.py", path.parent / "app" / "fork_server.py")
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    manifest = parse_manifest(store.blobs.get(res.snapshot), res.snapshot)
    pids = load_config(store.blobs, manifest)["runtime"]["gpu"]["pids"]
    assert len(pids) == 2, "the server and its helper both hold CUDA"
    actions = [c.split()[1] for c in fakenvidia.calls(folder) if c.startswith("--action")]
    assert actions == ["lock", "lock", "checkpoint", "checkpoint"], fakenvidia.calls(folder)

    out = run("gputree:v1", store=store, fallback="fail")
    try:
        actions = [c.split()[1] for c in fakenvidia.calls(folder) if c.startswith("--action")][4:]
        assert actions == ["restore", "restore", "unlock", "unlock"], fakenvidia.calls(folder)
        now = process.host_pids(out["pid"], pids)  # restored in a PID namespace of their own
        assert len(now) == 2 and all((folder / f"state-{p}").read_text() == "running" for p in now)
        first = post(port, "/infer")["helper"]
    finally:
        stop(out["pid"])
    cold = run("gputree:v1", store=store, mode="cold")
    try:
        assert post(port, "/infer")["helper"] == first
    finally:
        stop(cold["pid"])


def _environ(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def test_a_restore_goes_to_the_gpu_it_is_given_with_the_drivers_device_map(nvidia, recipe, store, run_cli):
    """Two stand-in H200s under driver r580: the checkpoint records the GPU its process
    used (nvidia-smi's compute apps), `--gpu 1` moves its state there with
    cuda-checkpoint's --device-map, and a GPU the node lacks is refused up front."""
    folder, lib = nvidia
    (folder / "gpus.csv").write_text(fakenvidia.h200s(2))
    gpu0, gpu1 = [row.split(", ")[2] for row in fakenvidia.h200s(2).splitlines()]
    port = free_port()
    runtime = built(recipe, store, port, lib)
    pid = runtime["gpu"]["pids"][0]
    assert runtime["gpu"]["uuids"] == [gpu0], "the GPU its process used, not every GPU of the machine"
    out = run("gpu:v1", store=store, gpus=["1"], fallback="fail")
    try:
        assert out["mode"] == "restore" and out["gpus"] == [gpu1] and out["device_map"] == {gpu0: gpu1}, out
        assert process.ns_pid(out["pid"]) == pid
        assert f"--action restore --pid {out['pid']} --device-map {gpu0}={gpu1}" in fakenvidia.calls(folder)
        assert post(port, "/count")["count"] == 3, "the warm state, on the other GPU"
    finally:
        stop(out["pid"])
    r = run_cli("restore", "gpu:v1", "--gpu", "7", tool="snapbuild-runner")
    assert r.code == 2 and "--gpu 7: this node has no such GPU" in r.err and gpu1 in r.err, r
    out = run("gpu:v1", store=store, fallback="fail")
    try:
        assert out["gpus"] == [gpu0] and out["device_map"] == {}, "by default: the GPU it was taken on"
        assert f"--action restore --pid {out['pid']}" in fakenvidia.calls(folder)
    finally:
        stop(out["pid"])


def test_a_driver_older_than_r580_restores_only_onto_the_same_gpu_else_boots_cold_there(nvidia, recipe, store):
    folder, lib = nvidia
    (folder / "gpus.csv").write_text(fakenvidia.h200s(2, driver="570.86.15"))
    gpu0, gpu1 = [row.split(", ")[2] for row in fakenvidia.h200s(2).splitlines()]
    port = free_port()
    built(recipe, store, port, lib)
    out = run("gpu:v1", store=store, gpus=["1"])
    try:
        assert out["mode"] == "cold" and out["gpus"] == [gpu1], out
        assert out["reason"].startswith("the GPU state cannot be placed here") and "cannot move CUDA state" in \
            out["reason"], out["reason"]
        assert _environ(out["pid"])["CUDA_VISIBLE_DEVICES"] == gpu1, "the cold server sees only its GPU"
        assert not any("--device-map" in c for c in fakenvidia.calls(folder))
    finally:
        stop(out["pid"])
    out = run("gpu:v1", store=store, gpus=[gpu0], fallback="fail")
    stop(out["pid"])
    assert out["mode"] == "restore" and out["gpus"] == [gpu0], "the same GPU needs no move"


def test_two_replicas_of_one_gpu_snapshot_side_by_side_each_on_its_own_gpu(nvidia, recipe, store):
    """isolation: namespaces with gpu: cuda: the checkpoint records its CUDA process by
    its namespace's PID; each replica's is found again below its own restored root, and
    its GPU state goes to the GPU it was given."""
    folder, lib = nvidia
    (folder / "gpus.csv").write_text(fakenvidia.h200s(2))
    gpu0, gpu1 = [row.split(", ")[2] for row in fakenvidia.h200s(2).splitlines()]
    runtime = built(recipe, store, free_port(), lib, ", isolation: namespaces")
    assert runtime["gpu"]["pid_ns"] is True and runtime["gpu"]["pids"] == [1], runtime["gpu"]
    replicas = []
    try:
        for gpu in ("0", "1"):
            replicas.append(run("gpu:v1", store=store, gpus=[gpu], publish="0", fallback="fail"))
        pids = [process.tree(r["pid"]) for r in replicas]
        assert all(r["mode"] == "restore" for r in replicas), replicas
        assert [r["gpus"] for r in replicas] == [[gpu0], [gpu1]]
        restores = [c for c in fakenvidia.calls(folder) if c.startswith("--action restore")]
        assert len(restores) == 2 and restores[1].endswith(f"--device-map {gpu0}={gpu1}"), restores
        assert not set(map(str, pids[0])) & {c.split()[3] for c in restores[1:]}, "each replica's own process"
        for r in replicas:
            host, port = r["address"].rsplit(":", 1)
            assert post(int(port), "/count")["count"] == 3, "each the warm state"
    finally:
        for r in replicas:
            stop(r["pid"])
