"""CUDA checkpointing: lock a process's CUDA calls, move its GPU state to host memory
(before the CPU dump), and the reverse after a restore.

Per process the driver goes RUNNING -> (lock) LOCKED -> (checkpoint) CHECKPOINTED, and
back with restore then unlock. Two ways to drive it, same steps:

- ``tool``: NVIDIA's ``cuda-checkpoint`` utility (``--action lock|checkpoint|restore|
  unlock --pid PID [--timeout MS]``, ``--get-state --pid PID``; a restore onto other GPUs
  adds ``--device-map OLD=NEW,...``, r580+), when it is on PATH.
  Inside a gVisor sandbox the same commands run through ``runsc exec``.
- ``driver``: the driver API itself (``cuCheckpointProcessLock/Checkpoint/Restore/
  Unlock/GetState``, driver r570 and later), through the ``cuda-bindings`` package
  (``cuda.bindings.driver``), else through ``libcuda.so.1`` with ctypes: no binary
  needed.

``auto`` takes the tool when it is on PATH, else the driver API. CRIU's own CUDA plugin,
when installed, sees the processes already CHECKPOINTED and leaves them so.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import time

from ..errors import SnapbuildError
from ..tools import run_killing_group

STATES = ("running", "locked", "checkpointed", "failed")


class CudaCheckpointError(SnapbuildError):
    exit_code = 8


def _fail(what: str, pid: int, detail: str) -> CudaCheckpointError:
    return CudaCheckpointError(f"CUDA {what} of pid {pid} failed: {detail}",
                               hint="`snapbuild doctor` checks the driver and cuda-checkpoint; driver r570 or "
                                    "later is needed for the driver API")


class ToolBackend:
    """``cuda-checkpoint`` (optionally run through ``prefix``, e.g. ``runsc exec CID``)."""

    name = "tool"

    def __init__(self, binary: str = "cuda-checkpoint", *, prefix: list[str] | None = None, run=run_killing_group):
        self.binary, self.prefix, self._run = binary, list(prefix or []), run

    def argv(self, action: str, pid: int, timeout_s: float | None = None,
             device_map: dict[str, str] | None = None) -> list[str]:
        if action == "state":
            return [*self.prefix, self.binary, "--get-state", "--pid", str(pid)]
        argv = [*self.prefix, self.binary, "--action", action, "--pid", str(pid)]
        if timeout_s:
            argv += ["--timeout", str(int(timeout_s * 1000))]
        if device_map:
            argv += ["--device-map", ",".join(f"{old}={new}" for old, new in device_map.items())]
        return argv

    def _call(self, action: str, pid: int, timeout_s: float | None = None, limit: float | None = None,
              device_map: dict[str, str] | None = None) -> str:
        argv = self.argv(action, pid, timeout_s, device_map)
        try:
            r = self._run(argv, capture_output=True, text=True, timeout=limit)
        except FileNotFoundError:
            raise CudaCheckpointError(f"{argv[0]} is not installed",
                                      hint="install NVIDIA's cuda-checkpoint, or use `cuda: {method: driver}`") from None
        except subprocess.TimeoutExpired:
            raise _fail(action, pid, f"{' '.join(argv)} did not finish in {limit:.0f} s") from None
        if r.returncode != 0:
            raise _fail(action, pid, (r.stdout + r.stderr).strip()[-500:] or f"exit {r.returncode}")
        return r.stdout.strip()

    def state(self, pid: int) -> str:
        out = self._call("state", pid, limit=60)
        return out if out in STATES else "failed"

    def lock(self, pid: int, timeout_s: float) -> None:
        self._call("lock", pid, timeout_s, limit=timeout_s + 30)

    def checkpoint(self, pid: int, timeout_s: float) -> None:
        self._call("checkpoint", pid, limit=timeout_s)

    def restore(self, pid: int, timeout_s: float, device_map: dict[str, str] | None = None) -> None:
        self._call("restore", pid, limit=timeout_s, device_map=device_map)

    def unlock(self, pid: int, timeout_s: float) -> None:
        self._call("unlock", pid, limit=timeout_s)


class _LockArgs(ctypes.Structure):  # CUcheckpointLockArgs: 64 bytes
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


class _Args(ctypes.Structure):  # CUcheckpoint{Checkpoint,Restore,Unlock}Args: 64 reserved bytes
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class _GpuPair(ctypes.Structure):  # CUcheckpointGpuPair: two CUuuid (16 bytes each)
    _fields_ = [("oldUuid", ctypes.c_ubyte * 16), ("newUuid", ctypes.c_ubyte * 16)]


class _RestoreArgs(ctypes.Structure):  # CUcheckpointRestoreArgs (r580+): GPU pairs, then reserved to 64 bytes
    _fields_ = [("gpuPairs", ctypes.POINTER(_GpuPair)), ("gpuPairsCount", ctypes.c_uint),
                ("reserved", ctypes.c_char * (64 - ctypes.sizeof(ctypes.c_void_p) - ctypes.sizeof(ctypes.c_uint)))]


def restore_args(device_map: dict[str, str]) -> tuple[_RestoreArgs, ctypes.Array]:
    """The driver's restore arguments that move each recorded GPU's state to its new
    GPU; the pairs array is returned too, to stay alive as long as the arguments."""
    from .placement import uuid_bytes

    pairs = (_GpuPair * len(device_map))()
    for pair, (old, new) in zip(pairs, device_map.items(), strict=True):
        pair.oldUuid[:], pair.newUuid[:] = uuid_bytes(old), uuid_bytes(new)
    return _RestoreArgs(gpuPairs=ctypes.cast(pairs, ctypes.POINTER(_GpuPair)), gpuPairsCount=len(device_map)), pairs


class _CtypesDriver:
    """The few driver calls needed, from libcuda.so.1, shaped like cuda.bindings.driver:
    each returns a tuple whose first item is the CUresult (0 is success)."""

    def __init__(self, lib=None) -> None:
        try:
            self._lib = lib or ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaCheckpointError(f"cannot load the CUDA driver (libcuda.so.1): {e}",
                                      hint="the driver API needs the NVIDIA driver on this machine") from None
        if not hasattr(self._lib, "cuCheckpointProcessLock"):
            raise CudaCheckpointError("this NVIDIA driver has no checkpoint API (cuCheckpointProcessLock)",
                                      hint="driver r570 or later has it; or install cuda-checkpoint")

    def cuInit(self, flags):
        return (self._lib.cuInit(ctypes.c_uint(flags)),)

    def cuCheckpointProcessGetState(self, pid):
        state = ctypes.c_int(-1)
        return self._lib.cuCheckpointProcessGetState(ctypes.c_int(pid), ctypes.byref(state)), state.value

    def cuCheckpointProcessLock(self, pid, args):
        return (self._lib.cuCheckpointProcessLock(ctypes.c_int(pid), ctypes.byref(args)),)

    def cuCheckpointProcessCheckpoint(self, pid, args):
        return (self._lib.cuCheckpointProcessCheckpoint(ctypes.c_int(pid), ctypes.byref(args)),)

    def cuCheckpointProcessRestore(self, pid, args):
        return (self._lib.cuCheckpointProcessRestore(ctypes.c_int(pid), ctypes.byref(args)),)

    def cuCheckpointProcessUnlock(self, pid, args):
        return (self._lib.cuCheckpointProcessUnlock(ctypes.c_int(pid), ctypes.byref(args)),)

    @staticmethod
    def CUcheckpointLockArgs():
        return _LockArgs()

    CUcheckpointCheckpointArgs = CUcheckpointRestoreArgs = CUcheckpointUnlockArgs = staticmethod(_Args)


def _bindings():
    """cuda.bindings.driver when installed (cuda-bindings / cuda-python), else ctypes."""
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]
        return driver
    except ImportError:
        return _CtypesDriver()


class DriverBackend:
    """The driver API (r570+). ``cu`` is cuda.bindings.driver or anything shaped like it."""

    name = "driver"

    def __init__(self, cu=None) -> None:
        self.cu = cu if cu is not None else _bindings()
        self._check("init", 0, self.cu.cuInit(0))  # restore needs the driver initialised in the caller

    @staticmethod
    def _code(result) -> int:
        err = result[0]
        return int(getattr(err, "value", err))

    def _check(self, what: str, pid: int, result) -> tuple:
        code = self._code(result)
        if code != 0:
            name = getattr(result[0], "name", None) or f"CUresult {code}"
            raise _fail(what, pid, name)
        return result

    def state(self, pid: int) -> str:
        result = self._check("state query", pid, self.cu.cuCheckpointProcessGetState(pid))
        value = int(getattr(result[1], "value", result[1]))
        return STATES[value] if 0 <= value < len(STATES) else "failed"

    def lock(self, pid: int, timeout_s: float) -> None:
        args = self.cu.CUcheckpointLockArgs()
        args.timeoutMs = int(timeout_s * 1000)
        self._check("lock", pid, self.cu.cuCheckpointProcessLock(pid, args))

    def checkpoint(self, pid: int, timeout_s: float) -> None:
        self._check("checkpoint", pid, self.cu.cuCheckpointProcessCheckpoint(pid, self.cu.CUcheckpointCheckpointArgs()))

    def restore(self, pid: int, timeout_s: float, device_map: dict[str, str] | None = None) -> None:
        if not device_map:
            self._check("restore", pid, self.cu.cuCheckpointProcessRestore(pid, self.cu.CUcheckpointRestoreArgs()))
            return
        # GPU pairs go through libcuda with ctypes, whichever binding serves the rest: the
        # structure is the driver's own and needs no Python wrapper of it
        cu = self.cu if isinstance(self.cu, _CtypesDriver) else _CtypesDriver()
        args, _pairs = restore_args(device_map)
        self._check("restore", pid, cu.cuCheckpointProcessRestore(pid, args))

    def unlock(self, pid: int, timeout_s: float) -> None:
        self._check("unlock", pid, self.cu.cuCheckpointProcessUnlock(pid, self.cu.CUcheckpointUnlockArgs()))


def backend(method: str = "auto", *, prefix: list[str] | None = None):
    """The backend a recipe's ``cuda.method`` names (``auto``: the tool if on PATH)."""
    if prefix is not None or method == "tool" or (method == "auto" and shutil.which("cuda-checkpoint")):
        return ToolBackend(prefix=prefix)
    if method in ("auto", "driver"):
        return DriverBackend()
    raise ValueError(f"unknown CUDA checkpoint method {method!r}")


def suspend(be, pids: list[int], *, lock_timeout_s: float, timeout_s: float) -> dict:
    """Lock, then checkpoint, every CUDA process; on failure, put back the ones done
    (unlocked and running) and raise. Returns seconds per phase."""
    timings = {"lock_s": 0.0, "checkpoint_s": 0.0}
    done: list[tuple[int, str]] = []
    try:
        for pid in pids:
            t = time.monotonic()
            be.lock(pid, lock_timeout_s)
            done.append((pid, "locked"))
            timings["lock_s"] += time.monotonic() - t
        for i, pid in enumerate(pids):
            t = time.monotonic()
            be.checkpoint(pid, timeout_s)
            done[i] = (pid, "checkpointed")
            timings["checkpoint_s"] += time.monotonic() - t
            state = be.state(pid)
            if state != "checkpointed":
                raise _fail("checkpoint", pid, f"the process is {state} afterwards, not checkpointed")
    except SnapbuildError:
        for pid, state in reversed(done):  # best effort: leave the server as it was
            try:
                if state == "checkpointed":
                    be.restore(pid, timeout_s)
                be.unlock(pid, timeout_s)
            except SnapbuildError:
                pass
        raise
    return {k: round(v, 3) for k, v in timings.items()}


def resume(be, pids: list[int], *, timeout_s: float, device_map: dict[str, str] | None = None) -> dict:
    """After a restore: GPU state back to the GPU for every CUDA process of the tree,
    then unlock them all. In that order, as for the dump (every process locked before
    any is checkpointed): a process unlocked while a peer's GPU state is still on the
    host could touch memory it shares with that peer (CUDA IPC handles, a shared
    allocator) before it is back."""
    timings = {"gpu_restore_s": 0.0, "unlock_s": 0.0}
    states = {pid: be.state(pid) for pid in pids}
    todo = [pid for pid in pids if states[pid] != "running"]  # running: taken without GPU state
    t = time.monotonic()
    for pid in todo:
        if states[pid] == "checkpointed":
            be.restore(pid, timeout_s, device_map) if device_map else be.restore(pid, timeout_s)
    timings["gpu_restore_s"] = time.monotonic() - t
    t = time.monotonic()
    for pid in todo:
        be.unlock(pid, timeout_s)
    timings["unlock_s"] = time.monotonic() - t
    for pid in todo:
        state = be.state(pid)
        if state != "running":
            raise _fail("unlock", pid, f"the process is {state} afterwards, not running")
    return {k: round(v, 3) for k, v in timings.items()}
