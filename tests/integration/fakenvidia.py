"""Stand-ins for the NVIDIA parts of a GPU node, for tests on machines without a GPU.

``install(folder)`` writes two executables into ``folder/bin``:

- ``nvidia-smi``: answers ``--query-gpu=...`` with the rows in ``folder/gpus.csv``
  (edit it to make "another node"), ``--query-compute-apps=pid,gpu_uuid`` with every
  process that maps libcuda.so.1, on the GPU its ``CUDA_VISIBLE_DEVICES`` names first
  (else GPU 0), and otherwise prints a banner with the CUDA version;
- ``cuda-checkpoint``: keeps each PID's CUDA state in ``folder/state-<pid>`` and
  enforces the driver's transitions (running -lock-> locked -checkpoint-> checkpointed
  -restore-> locked -unlock-> running), failing like the real tool on a wrong one; a
  process under a new PID (a restore in namespaces of its own, or in a container)
  whose command line was checkpointed and that started since is ``checkpointed``;
  ``--device-map`` (a restore onto other GPUs) is refused under a driver older than
  r580, as that tool has no such option; every call is appended to ``folder/calls.log``.

A process "uses CUDA" when it maps a file named libcuda.so.1: ``fake_libcuda(folder)``
makes one to map. Everything else (CRIU, the restore, the runner) is real.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

H200 = "0, NVIDIA H200, GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000001, 9.0, 143771, 570.86.15, Disabled\n"
B200 = "0, NVIDIA B200, GPU-7b2a11f0-aaaa-bbbb-cccc-000000000002, 10.0, 183359, 570.86.15, Disabled\n"


def h200s(count: int, driver: str = "580.65.06", first: int = 0x10) -> str:
    """``count`` H200 rows under ``driver`` (r580: restores onto other GPUs)."""
    return "".join(f"{i}, NVIDIA H200, GPU-1d5f4c2e-aaaa-bbbb-cccc-0000000000{first + i:02x}, 9.0, 143771, "
                   f"{driver}, Disabled\n" for i in range(count))

SMI = '''#!{python}
import os, sys
folder = {folder!r}
rows = [r.split(", ") for r in open(os.path.join(folder, "gpus.csv")).read().splitlines() if r.strip()]
if any(a.startswith("--query-gpu=") for a in sys.argv[1:]):
    sys.stdout.write(open(os.path.join(folder, "gpus.csv")).read())
elif any(a.startswith("--query-compute-apps=") for a in sys.argv[1:]):
    for p in os.listdir("/proc"):
        try:
            if not p.isdigit() or "libcuda.so.1" not in open(f"/proc/{{p}}/maps").read():
                continue
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{{p}}/environ").read().split(chr(0)) if "=" in kv)
        except OSError:
            continue
        first = (env.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        uuid = next((r[2] for r in rows if first in (r[0], r[2])), rows[0][2])
        print(f"{{p}}, {{uuid}}")
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
def image_of(p):
    """Where the stand-in keeps that a process with this command line was checkpointed."""
    import hashlib
    return os.path.join(folder, "image-" + hashlib.sha256(open(f"/proc/{{p}}/cmdline", "rb").read()).hexdigest()[:16])
def started_at(p):
    ticks = int(open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[19])
    btime = next(int(ln.split()[1]) for ln in open("/proc/stat") if ln.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")
def state_of(p):
    f = os.path.join(folder, "state-" + p)
    if os.path.exists(f):
        return open(f).read()
    try:  # a process restored from a checkpoint of this command line, under a new PID
        image = image_of(p)
        if os.path.exists(image) and started_at(p) >= os.stat(image).st_mtime - 1:
            return "checkpointed"
    except OSError:
        pass
    return "running"
state = state_of(pid)
if "--get-state" in args:
    print(state)
    sys.exit(0)
action = args[args.index("--action") + 1]
driver = open(os.path.join(folder, "gpus.csv")).read().split(", ")[5]
if "--device-map" in args and int(driver.split(".")[0]) < 580:
    print("Error: unrecognized option '--device-map'")
    sys.exit(1)
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
blocking = {{"checkpoint": "running", "unlock": "checkpointed"}}.get(action)
for peer in cuda_peers() if blocking else []:
    if state_of(peer) == blocking:
        print(f"Error: cannot {{action}} process {{pid}}: process {{peer}} of its tree is still {{blocking}}")
        sys.exit(1)
if os.path.exists(os.path.join(folder, "fail-" + action)):
    print(f"Error: {{action}} failed (injected)")
    sys.exit(1)
open(path, "w").write(moves[(action, state)])
if action == "checkpoint":
    open(image_of(pid), "w").close()
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


def fake_cdi(folder: Path, uuids: list[str], as_json: bool = False) -> tuple[Path, Path]:
    """Stand-in GPU device nodes in ``folder/dev`` (``nvidia0``.. as char 195:i,
    ``nvidiactl`` 195:255, ``nvidia-uvm`` 237:0; mknod needs root) and a CDI spec of
    them in ``folder/cdi/nvidia.yaml``, shaped as ``nvidia-ctk cdi generate`` writes
    it: a device per index and per UUID, ``all``, and the control nodes and
    ``NVIDIA_VISIBLE_DEVICES=void`` in the spec's own edits (no hook: the stand-in has
    no nvidia-cdi-hook). ``as_json`` writes the same spec as JSON text (still valid
    YAML), which a base install without PyYAML reads. Returns (cdi folder, dev folder)."""
    import json
    import stat

    dev, cdi = folder / "dev", folder / "cdi"
    for d in (dev, cdi):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)

    def node(name: str, major: int, minor: int) -> dict:
        path = dev / name
        if path.exists():
            path.unlink()
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)
        return {"path": f"/dev/{name}", "hostPath": str(path)}

    gpus = [node(f"nvidia{i}", 195, i) for i in range(len(uuids))]
    devices = [{"name": str(i), "containerEdits": {"deviceNodes": [g]}} for i, g in enumerate(gpus)]
    devices += [{"name": u, "containerEdits": {"deviceNodes": [g]}} for u, g in zip(uuids, gpus, strict=True)]
    devices.append({"name": "all", "containerEdits": {"deviceNodes": gpus}})
    spec = {"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu", "devices": devices,
            "containerEdits": {"env": ["NVIDIA_VISIBLE_DEVICES=void"],
                               "deviceNodes": [node("nvidiactl", 195, 255), node("nvidia-uvm", 237, 0)]}}
    if as_json:
        text = json.dumps(spec, indent=1)
    else:
        import yaml

        text = yaml.safe_dump(spec, sort_keys=False)
    path = cdi / "nvidia.yaml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return cdi, dev
