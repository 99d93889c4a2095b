"""Which GPUs a GPU snapshot goes to (snapbuild.gpu.placement), and how the device
map reaches cuda-checkpoint and the driver API."""

from __future__ import annotations

import ctypes
import subprocess

import pytest

from snapbuild.errors import UsageError
from snapbuild.gpu import cuda, placement

A, B, C = (f"GPU-1d5f4c2e-aaaa-bbbb-cccc-00000000000{i}" for i in (1, 2, 3))


def node(*uuids, driver="580.65.06"):
    return {"model": "NVIDIA H200", "count": len(uuids), "uuids": list(uuids), "driver": driver}


def taken_on(*uuids):
    return {"pids": [7], "uuids": list(uuids), "fingerprint": node(*uuids)}


def test_parse_takes_commas_and_repeats():
    assert placement.parse(None) is None and placement.parse(" , ") is None
    assert placement.parse("0, 1") == ["0", "1"] and placement.parse(["2", "GPU-x,3"]) == ["2", "GPU-x", "3"]


def test_by_default_the_gpus_it_was_taken_on_else_the_first_ones():
    got, why = placement.place(taken_on(B), node(A, B, C), None)
    assert why is None and got.targets == [B] and got.device_map == {}, "the build machine: no move"
    got, why = placement.place(taken_on("GPU-1d5f4c2e-aaaa-bbbb-cccc-0000000000ff"), node(A, B), None)
    assert why is None and got.targets == [A] and got.device_map == {"GPU-1d5f4c2e-aaaa-bbbb-cccc-0000000000ff": A}


def test_a_named_gpu_by_index_or_uuid_moves_the_state_there():
    got, _ = placement.place(taken_on(A), node(A, B, C), ["2"])
    assert got.targets == [C] and got.device_map == {A: C}
    got, _ = placement.place(taken_on(A), node(A, B, C), [B])
    assert got.to_json() == {"gpus": [B], "device_map": {A: B}}


def test_an_old_driver_restores_only_onto_the_same_gpus():
    got, why = placement.place(taken_on(A), node(A, B, driver="570.86.15"), ["0"])
    assert why is None and got.targets == [A], "same GPU: no device map needed"
    got, why = placement.place(taken_on(A), node(A, B, driver="570.86.15"), ["1"])
    assert got is None and "driver 570.86.15 cannot move CUDA state to other GPUs" in why and "r580" in why


def test_too_few_gpus_and_wrong_names_say_what_the_node_has():
    got, why = placement.place(taken_on(A, B), node(C), None)
    assert got is None and "on 2 GPU(s), this node has 1" in why
    with pytest.raises(UsageError, match=r"--gpu 5: this node has no such GPU \(its GPUs: 0: GPU-.*1, 1: GPU-.*2\)"):
        placement.place(taken_on(A), node(A, B), ["5"])
    with pytest.raises(UsageError, match="names 2 GPU.*state is on 1"):
        placement.place(taken_on(A), node(A, B), ["0", "1"])
    with pytest.raises(UsageError, match="twice"):
        placement.resolve(["0", A], node(A, B))


def test_snapshots_from_before_the_used_gpus_were_recorded_use_the_build_machines():
    old = {"pids": [7], "fingerprint": node(A, B)}
    assert placement.recorded_uuids(old) == [A, B]
    assert placement.cold_targets(old, node(C, A, B), None) == [A, B]
    assert placement.cold_targets(None, node(A), None) is None, "no GPU state, no --gpu: nothing assigned"
    assert placement.cold_targets(None, node(A, B), ["1"]) == [B]


def test_the_tool_gets_a_device_map():
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="checkpointed\n" if "--get-state" in argv else "",
                                           stderr="")

    cuda.ToolBackend(run=fake_run).restore(7, 60, {A: C, B: A})
    assert calls == [["cuda-checkpoint", "--action", "restore", "--pid", "7", "--device-map", f"{A}={C},{B}={A}"]]


def test_the_driver_api_gets_gpu_pairs_as_16_byte_uuids():
    seen = []

    class Lib:
        def cuInit(self, flags):
            return 0

        def cuCheckpointProcessLock(self, pid, args):
            return 0

        def cuCheckpointProcessRestore(self, pid, args):
            a = args._obj
            pairs = [bytes(a.gpuPairs[i]) for i in range(a.gpuPairsCount)]
            seen.append((pid.value, ctypes.sizeof(a), pairs))
            return 0

    be = cuda.DriverBackend(cuda._CtypesDriver(Lib()))
    be.restore(9, 60, {A: C})
    [(pid, size, [pair])] = seen
    assert pid == 9 and size == 64
    assert pair == bytes.fromhex("1d5f4c2eaaaabbbbcccc000000000001" + "1d5f4c2eaaaabbbbcccc000000000003")
    with pytest.raises(ValueError, match="not a GPU UUID"):
        placement.uuid_bytes("GPU-nothex")


def test_a_resume_acts_only_on_processes_of_the_restored_tree():
    """The PIDs come from the snapshot: PID 1 (the node's init) is not below this
    test's process, so nothing is run on it and the restore counts as failed."""
    import os

    from snapbuild.gpu import snapshot as gpu_snapshot

    with pytest.raises(gpu_snapshot.GpuSnapshotError, match="lacks some of the CUDA processes"):
        gpu_snapshot.resume({"pids": [1], "method": "tool", "pid_ns": False}, root=os.getpid())


def test_a_node_needs_as_many_gpus_as_the_checkpoint_used_not_as_the_build_machine_had(monkeypatch):
    """One GPU's state taken on an eight-GPU machine restores on a two-GPU node."""
    from snapbuild.gpu import fingerprint as gpu_fp
    from snapbuild.gpu import snapshot as gpu_snapshot

    eight = [f"GPU-1d5f4c2e-aaaa-bbbb-cccc-0000000000{i:02x}" for i in range(8)]
    gpu = {"pids": [7], "uuids": [eight[3]], "fingerprint": {**node(*eight), "compute_capability": "9.0"}}
    monkeypatch.setattr(gpu_fp, "node_gpus", lambda: {**node(A, B), "compute_capability": "9.0"})
    assert [m.field for m in gpu_snapshot.mismatches(gpu) if m.fatal] == []
    del gpu["uuids"]  # a snapshot from before the used GPUs were recorded: all eight
    assert [m.field for m in gpu_snapshot.mismatches(gpu) if m.fatal] == ["gpu.count"]
