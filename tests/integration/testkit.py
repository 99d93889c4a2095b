"""Small helpers the integration tests share: ports, HTTP calls to test servers, and a
recipe of the counter server mapping a weights file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def post(port: int, path: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read()


COUNTER = Path(__file__).parent / "data" / "counter_server.py"


def weights_counter_recipe(recipe, port: int, *, name: str, data: str, mount: Path | None = None,
                           size: int = 2 << 20) -> tuple[Path, bytes]:
    """A snapshot of the counter server memory-mapping `w.bin` (``size`` random bytes)
    of the files step ``data`` (the folder of that name beside the recipe, which may
    hold more): through ``$SNAPBUILD_INPUTS``, or, with ``mount``, at that fixed path
    (`mounts:`). Tagged ``NAME:v1``. Returns the recipe's path and the weights."""
    if mount is None:
        needs, weights = f"[app, {data}]", f"$SNAPBUILD_INPUTS/{data}/w.bin"
    else:
        needs, weights = f'[app]\n            mounts: {{"{mount}": {data}}}', f"{mount}/w.bin"
    path = recipe(f"""
        name: {name}
        steps:
          app: {{kind: files, root: app}}
          {data}: {{kind: files, root: {data}}}
          server:
            kind: warmup
            needs: {needs}
            run: "{sys.executable} $SNAPBUILD_INPUTS/app/counter_server.py --port {port} --weights {weights}"
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
            exercise: [{{http: "POST /count", repeat: 2}}]
          snap: {{kind: checkpoint, process: server}}
        publish: {{tag: "{name}:v1"}}
    """)
    for d in ("app", data):
        (path.parent / d).mkdir(exist_ok=True)
    shutil.copy(COUNTER, path.parent / "app" / "counter_server.py")
    content = os.urandom(size)
    (path.parent / data / "w.bin").write_bytes(content)
    return path, content


def kill_counter_restore(cmd: list[str], env: dict, delay: float, port: int) -> None:
    """Run a restore command of a counter server snapshot, SIGKILL it (its whole process
    group) after ``delay`` seconds, and kill the server too if it got that far."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", f"counter_server.py --port {port}"])


def rollup(pid: int, field: str) -> int:
    """One of ``pid``'s memory totals (``Pss``, ``AnonHugePages``...) in bytes, from
    /proc/PID/smaps_rollup."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(field + ":"))


def huge_pages(pid: int) -> tuple[int, str]:
    """``pid``'s transparent huge pages (AnonHugePages, bytes) and the huge page advice
    of its largest memory area (``hg``, ``nh``, both or ``none``, from smaps' VmFlags)."""
    huge = rollup(pid, "AnonHugePages")
    largest, flags, size = 0, "", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("VmFlags:") and size > largest:
            largest, flags = size, line
    return huge, " ".join(f for f in flags.split()[1:] if f in ("hg", "nh")) or "none"


# A child's peak memory: os.wait4's ru_maxrss of a child forked straight from pytest
# starts at pytest's own resident size (the kernel records the forked copy's high-water
# mark at exec), hundreds of MiB into a full run. A small Python forks the command
# instead and reports the command's own figure.
_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def measured(argv: list[str], *, env: dict, timeout: float, stdout, stderr, during=None) -> tuple[int, float, int]:
    """Run ``argv`` to its end (its process group SIGKILLed after ``timeout`` s), calling
    ``during()`` every 10 ms meanwhile: (exit status, wall seconds, peak RSS in bytes of
    the command itself)."""
    import tempfile

    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _MEASURE, rss.name, *argv], env=env,
                                stdout=stdout, stderr=stderr, start_new_session=True)
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
            if during is not None:
                during()
            time.sleep(0.01)
        wall = time.monotonic() - t0
        peak = int(rss.read() or 0)
    return proc.returncode, wall, peak
