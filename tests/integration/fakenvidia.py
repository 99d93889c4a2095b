"""Stand-ins for the NVIDIA parts of a GPU node, for tests on machines without a GPU.

``install(folder)`` writes two executables into ``folder/bin``:

- ``nvidia-smi``: answers ``--query-gpu=...`` with the rows in ``folder/gpus.csv``
  (edit it to make "another node") and otherwise prints a banner with the CUDA version;
- ``cuda-checkpoint``: keeps each PID's CUDA state in ``folder/state-<pid>`` and
  enforces the driver's transitions (running -lock-> locked -checkpoint-> checkpointed
  -restore-> locked -unlock-> running), failing like the real tool on a wrong one;
  every call is appended to ``folder/calls.log``.

A process "uses CUDA" when it maps a file named libcuda.so.1: ``fake_libcuda(folder)``
makes one to map. Everything else (CRIU, the restore, the runner) is real.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

H200 = "0, NVIDIA H200, GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000001, 9.0, 143771, 570.86.15, Disabled\n"
B200 = "0, NVIDIA B200, GPU-7b2a11f0-aaaa-bbbb-cccc-000000000002, 10.0, 183359, 570.86.15, Disabled\n"

SMI = '''#!{python}
import os, sys
folder = {folder!r}
if any(a.startswith("--query-gpu=") for a in sys.argv[1:]):
    sys.stdout.write(open(os.path.join(folder, "gpus.csv")).read())
else:
    print("| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |")
'''

TOOL = '''#!{python}
import os, sys
folder = {folder!r}
args = sys.argv[1:]
with open(os.path.join(folder, "calls.log"), "a") as log:
    log.write(" ".join(args) + "\\n")
pid = args[args.index("--pid") + 1]
path = os.path.join(folder, "state-" + pid)
state = open(path).read() if os.path.exists(path) else "running"
if "--get-state" in args:
    print(state)
    sys.exit(0)
action = args[args.index("--action") + 1]
moves = {{("lock", "running"): "locked", ("checkpoint", "locked"): "checkpointed",
          ("restore", "checkpointed"): "locked", ("unlock", "locked"): "running"}}
if (action, state) not in moves:
    print(f"Error: cannot {{action}} process {{pid}} in state {{state}}")
    sys.exit(1)
def cuda_peers():
    """The other processes of this one's session that map libcuda.so.1."""
    sid, out = os.getsid(int(pid)), []
    for p in os.listdir("/proc"):
        if p.isdigit() and p != pid:
            try:
                if os.getsid(int(p)) == sid and "libcuda.so.1" in open(f"/proc/{{p}}/maps").read():
                    out.append(p)
            except OSError:
                pass
    return out
def state_of(p):
    f = os.path.join(folder, "state-" + p)
    return open(f).read() if os.path.exists(f) else "running"
blocking = {{"checkpoint": "running", "unlock": "checkpointed"}}.get(action)
for peer in cuda_peers() if blocking else []:
    if state_of(peer) == blocking:
        print(f"Error: cannot {{action}} process {{pid}}: process {{peer}} of its tree is still {{blocking}}")
        sys.exit(1)
if os.path.exists(os.path.join(folder, "fail-" + action)):
    print(f"Error: {{action}} failed (injected)")
    sys.exit(1)
open(path, "w").write(moves[(action, state)])
'''


def install(folder: Path, gpus: str = H200) -> Path:
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (folder / "gpus.csv").write_text(gpus)
    for name, text in (("nvidia-smi", SMI), ("cuda-checkpoint", TOOL)):
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable, folder=str(folder)))
        os.chmod(path, 0o755)
    return bin_dir


def fake_libcuda(folder: Path) -> Path:
    lib = folder / "lib" / "libcuda.so.1"
    lib.parent.mkdir(parents=True, exist_ok=True)
    lib.write_bytes(b"\x7fELF not really the CUDA driver" + bytes(4096))
    return lib


def calls(folder: Path) -> list[str]:
    path = folder / "calls.log"
    return path.read_text().splitlines() if path.exists() else []
