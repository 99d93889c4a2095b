"""GPU snapshots without a GPU: fingerprints and their comparison, the refusal rules,
the command lines given to cuda-checkpoint and runsc, and the driver-API calls made
through a small fake of the cuda-bindings module (FakeDriver below: it keeps each
PID's state and refuses the transitions the driver refuses)."""

from __future__ import annotations

import mmap
import subprocess
import sys

import pytest

from snapbuild.gpu import cuda
from snapbuild.gpu import fingerprint as gpu_fp
from snapbuild.gpu import snapshot as gpu_snapshot

ROW = "0, NVIDIA H200, GPU-aaa, 9.0, 143771, 570.86.15, Disabled"
BANNER = "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |"


def fp(rows=(ROW,)):
    return gpu_fp.from_smi("\n".join(rows) + "\n", BANNER)


def test_a_fingerprint_from_nvidia_smi():
    two = fp([ROW, ROW.replace("0, ", "1, ", 1).replace("GPU-aaa", "GPU-bbb")])
    assert two == {"model": "NVIDIA H200", "count": 2, "models": ["NVIDIA H200"], "uuids": ["GPU-aaa", "GPU-bbb"],
                   "compute_capability": "9.0", "memory_mib": 143771, "driver": "570.86.15", "cuda": "12.8",
                   "mig": []}
    assert gpu_fp.key_part(two) == {"model": "NVIDIA H200", "count": 2, "compute_capability": "9.0",
                                    "driver": "570.86.15"}
    assert gpu_fp.from_smi("", BANNER) is None
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        gpu_fp.parse_query("0, NVIDIA H200\n")


@pytest.mark.parametrize("node_rows, fatal, text", [
    ([ROW.replace("NVIDIA H200", "NVIDIA B200").replace("9.0", "10.0")], ["gpu.model"],
     "different GPU: built on NVIDIA H200, this node has NVIDIA B200"),
    ([ROW.replace("570.86.15", "575.51.03")], ["gpu.driver"], "only under the driver version that made them"),
    ([ROW.replace("143771", "81559")], ["gpu.memory"], "81559 MiB per GPU here"),
    ([ROW.replace("Disabled", "Enabled")], ["gpu.mig"], "MIG is enabled"),
])
def test_mismatches_are_explained(node_rows, fatal, text):
    got = gpu_fp.compare(fp(), fp(node_rows))
    assert [m.field for m in got if m.fatal] == fatal
    assert any(text in m.message for m in got), [m.message for m in got]


def test_counts_and_missing_gpus():
    two = fp([ROW, ROW.replace("0, ", "1, ", 1)])
    assert [m.field for m in gpu_fp.compare(two, fp()) if m.fatal] == ["gpu.count"]
    assert [(m.field, m.fatal) for m in gpu_fp.compare(fp(), two)] == [("gpu.count", False)]
    [m] = gpu_fp.compare(fp(), None)
    assert m.fatal and "this node has no NVIDIA GPU" in m.message
    assert gpu_fp.compare(None, fp()) == [], "a snapshot without GPU state restores anywhere"


@pytest.fixture
def mapping_process(tmp_path):
    """Start processes that map a file of a given name (what /proc/PID/maps shows)."""
    procs = []

    def start(*names, env=None):
        files = []
        for name in names:
            f = tmp_path / f"{len(procs)}" / name
            f.parent.mkdir(exist_ok=True)
            f.write_bytes(bytes(mmap.PAGESIZE))
            files.append(str(f))
        code = ("import mmap, sys, time\nfs = [open(p, 'rb') for p in sys.argv[1:]]\n"
                "ms = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in fs]\n"
                "print('ok', flush=True)\ntime.sleep(60)")
        p = subprocess.Popen([sys.executable, "-c", code, *files], stdout=subprocess.PIPE, env=env)
        assert p.stdout.readline() == b"ok\n"
        procs.append(p)
        return p.pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_cuda_processes_are_the_ones_mapping_libcuda(mapping_process):
    cuda_pid = mapping_process("libcuda.so.1")
    other = mapping_process("libcudart.so.12")
    assert gpu_fp.cuda_processes([cuda_pid, other]) == [cuda_pid]


def test_refusals_mig_mps_and_nccl(mapping_process):
    one = mapping_process("libcuda.so.1")
    assert gpu_fp.unsupported([one], fp(), mps_running=lambda: False) == []
    [mig] = gpu_fp.unsupported([one], fp([ROW.replace("Disabled", "Enabled")]), mps_running=lambda: False)
    assert "MIG" in mig
    [mps] = gpu_fp.unsupported([one], fp(), mps_running=lambda: True)
    assert "MPS" in mps
    client = mapping_process("libcuda.so.1", env={"CUDA_MPS_PIPE_DIRECTORY": "/tmp/mps", "PATH": "/usr/bin"})
    assert any("MPS" in r for r in gpu_fp.unsupported([client], fp(), mps_running=lambda: False))
    a = mapping_process("libcuda.so.1", "libnccl.so.2")
    b = mapping_process("libcuda.so.1", "libnccl.so.2")
    [nccl] = gpu_fp.unsupported([a, b], fp(), mps_running=lambda: False)
    assert "2 processes use CUDA and 2 of them NCCL" in nccl
    assert gpu_fp.unsupported([a], fp(), mps_running=lambda: False) == [], "one process with NCCL is fine"


class FakeDriver:
    """A stand-in for cuda.bindings.driver: the calls snapbuild makes, with the
    driver's state machine per PID. Results are tuples whose first item is a CUresult."""

    RUNNING, LOCKED, CHECKPOINTED, FAILED = range(4)
    ILLEGAL_STATE = 401

    class _Args:
        pass

    CUcheckpointLockArgs = CUcheckpointCheckpointArgs = CUcheckpointRestoreArgs = CUcheckpointUnlockArgs = _Args

    def __init__(self):
        self.state, self.calls, self.fail = {}, [], set()
        self.initialised = False

    def cuInit(self, flags):
        self.initialised = True
        return (0,)

    def _move(self, name, pid, frm, to):
        self.calls.append((name, pid))
        assert self.initialised, "cuInit first"
        if name in self.fail or self.state.get(pid, self.RUNNING) != frm:
            return (self.ILLEGAL_STATE,)
        self.state[pid] = to
        return (0,)

    def cuCheckpointProcessGetState(self, pid):
        return 0, self.state.get(pid, self.RUNNING)

    def cuCheckpointProcessLock(self, pid, args):
        self.calls.append(("timeoutMs", args.timeoutMs))
        return self._move("lock", pid, self.RUNNING, self.LOCKED)

    def cuCheckpointProcessCheckpoint(self, pid, args):
        return self._move("checkpoint", pid, self.LOCKED, self.CHECKPOINTED)

    def cuCheckpointProcessRestore(self, pid, args):
        return self._move("restore", pid, self.CHECKPOINTED, self.LOCKED)

    def cuCheckpointProcessUnlock(self, pid, args):
        return self._move("unlock", pid, self.LOCKED, self.RUNNING)


def test_driver_api_suspend_then_resume():
    cu = FakeDriver()
    be = cuda.DriverBackend(cu)
    t = cuda.suspend(be, [11, 12], lock_timeout_s=30, timeout_s=600)
    assert set(t) == {"lock_s", "checkpoint_s"}
    assert cu.calls == [("timeoutMs", 30000), ("lock", 11), ("timeoutMs", 30000), ("lock", 12),
                        ("checkpoint", 11), ("checkpoint", 12)], "every process locked before any is checkpointed"
    assert be.state(11) == be.state(12) == "checkpointed"
    cu.calls.clear()
    cuda.resume(be, [11, 12], timeout_s=600)
    assert cu.calls == [("restore", 11), ("restore", 12), ("unlock", 11), ("unlock", 12)], \
        "every process's GPU state back before any is unlocked"
    assert be.state(11) == be.state(12) == "running"


def test_a_failed_checkpoint_puts_the_processes_back_and_names_the_error():
    cu = FakeDriver()
    cu.fail.add("checkpoint")
    with pytest.raises(cuda.CudaCheckpointError, match="CUDA checkpoint of pid 11 failed: CUresult 401"):
        cuda.suspend(cuda.DriverBackend(cu), [11, 12], lock_timeout_s=1, timeout_s=1)
    assert cu.state == {11: FakeDriver.RUNNING, 12: FakeDriver.RUNNING}, "both unlocked again"


def test_tool_command_lines():
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="checkpointed\n" if "--get-state" in argv else "",
                                           stderr="")

    be = cuda.ToolBackend(run=fake_run)
    cuda.suspend(be, [7], lock_timeout_s=2.5, timeout_s=60)
    assert calls == [["cuda-checkpoint", "--action", "lock", "--pid", "7", "--timeout", "2500"],
                     ["cuda-checkpoint", "--action", "checkpoint", "--pid", "7"],
                     ["cuda-checkpoint", "--get-state", "--pid", "7"]]

    def failing(argv, **kw):
        return subprocess.CompletedProcess(argv, 1, stdout="Error: OPERATION_NOT_SUPPORTED", stderr="")

    with pytest.raises(cuda.CudaCheckpointError, match="CUDA lock of pid 7 failed: Error: OPERATION_NOT_SUPPORTED"):
        cuda.ToolBackend(run=failing).lock(7, 1)
    with pytest.raises(cuda.CudaCheckpointError, match="is not installed"):
        cuda.ToolBackend("/nonexistent/cuda-checkpoint").lock(7, 1)


def test_inside_gvisor_the_tool_runs_through_runsc_exec_with_nvproxy():
    from snapbuild.engines.oci import RunscEngine

    class Runsc(RunscEngine):
        def path(self):
            return "/usr/local/bin/runsc"

    calls, state = [], {}
    after = {"lock": "locked", "checkpoint": "checkpointed", "restore": "locked", "unlock": "running"}

    def fake_run(argv, **kw):
        calls.append(argv)
        if "grep" in " ".join(argv):
            out = "/proc/1/maps\n/proc/23/maps\n"
        else:
            pid = argv[argv.index("--pid") + 1]
            if "--action" in argv:
                state[pid] = after[argv[argv.index("--action") + 1]]
            out = state.get(pid, "running") if "--get-state" in argv else ""
        return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")

    opts = type("O", (), {"lock_timeout": 10, "timeout": 60})()
    gpu_fp_node = fp()
    orig = gpu_fp.node_gpus
    gpu_fp.node_gpus = lambda: gpu_fp_node
    try:
        got = gpu_snapshot.suspend_sandbox(Runsc(), "cid-1", opts, lambda _m: None, run=fake_run)
    finally:
        gpu_fp.node_gpus = orig
    prefix = ["/usr/local/bin/runsc", "--nvproxy=true", "exec", "cid-1"]
    assert got["pids"] == [1, 23] and got["sandbox"] is True
    assert calls[0][:4] == prefix and calls[1] == prefix + ["cuda-checkpoint", "--action", "lock", "--pid", "1",
                                                            "--timeout", "10000"]
    calls.clear()
    gpu_snapshot.resume(got, prefix=prefix, run=fake_run)
    actions = [c[len(prefix):] for c in calls if "--action" in c]
    assert actions == [["cuda-checkpoint", "--action", a, "--pid", p] for a in ("restore", "unlock") for p in ("1", "23")]
    assert all(c[:4] == prefix for c in calls), "every call inside the sandbox"


def test_ctypes_path_speaks_the_driver_api_with_64_byte_args():
    class Lib:
        def __init__(self):
            self.calls = []

        def cuInit(self, flags):
            return 0

        def cuCheckpointProcessLock(self, pid, args):
            import ctypes

            self.calls.append(("lock", pid.value, ctypes.sizeof(args._obj), args._obj.timeoutMs))
            return 0

        def cuCheckpointProcessGetState(self, pid, state):
            state._obj.value = 1
            return 0

    lib = Lib()
    be = cuda.DriverBackend(cuda._CtypesDriver(lib))
    be.lock(99, 1.5)
    assert lib.calls == [("lock", 99, 64, 1500)] and be.state(99) == "locked"
    with pytest.raises(cuda.CudaCheckpointError, match="no checkpoint API"):
        cuda._CtypesDriver(object())


def test_checkpoint_spec_rules():
    from pydantic import ValidationError

    from snapbuild.steps.checkpoint import CheckpointSpec, _engine_options

    with pytest.raises(ValidationError, match="need gpu: cuda"):
        CheckpointSpec(kind="checkpoint", process="s", cuda={"timeout": 5})
    with pytest.raises(ValidationError, match="`gpus:` is for gpu: cuda with engine runc"):
        CheckpointSpec(kind="checkpoint", process="s", gpu="cuda", gpus=2)
    runc = CheckpointSpec(kind="checkpoint", process="s", engine="runc", gpu="cuda")
    assert "gpus" not in runc.key_fields(), "keys of runc GPU checkpoints without `gpus:` as before it existed"
    two = CheckpointSpec(kind="checkpoint", process="s", engine="runc", gpu="cuda", gpus=2)
    assert two.key_fields()["gpus"] == 2
    a = CheckpointSpec(kind="checkpoint", process="s", gpu="cuda", cuda={"timeout": 5})
    b = CheckpointSpec(kind="checkpoint", process="s", gpu="cuda", cuda={"timeout": 900, "method": "driver"})
    assert a.key_fields() == b.key_fields() and "cuda" not in a.key_fields(), "how state moves changes no output"
    assert a.key_fields() != CheckpointSpec(kind="checkpoint", process="s").key_fields()
    runsc = CheckpointSpec(kind="checkpoint", process="s", engine="runsc", gpu="cuda", runsc={"direct": True})
    assert _engine_options(runsc)["nvproxy"] is True and _engine_options(runsc)["direct"] is True


def test_timeouts_reach_the_tool():
    seen = []

    def slow(argv, **kw):
        seen.append(kw.get("timeout"))
        raise subprocess.TimeoutExpired(argv, kw.get("timeout"))

    with pytest.raises(cuda.CudaCheckpointError, match="did not finish in 42 s"):
        cuda.ToolBackend(run=slow).checkpoint(5, 42)
    assert seen == [42]
