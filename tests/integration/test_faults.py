"""Crash safety and concurrency of the store, with real processes.

A build killed with SIGKILL at any moment must leave nothing half-written visible:
every blob hashes to its name, every cache entry points at complete data, every tag
names a manifest whose blobs are all present; the next build completes and
`cache verify` finds no problem.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapbuild.store import Store

SNAPBUILD = str(Path(sys.executable).parent / "snapbuild")

# Enough data that storing it takes a noticeable time, across several steps, so the
# kills land while chunks, trees, refs, logs and the registry are being written.
HEAVY = """
name: heavy
steps:
  gen1: {kind: command, run: "head -c 30000000 /dev/urandom > a.bin; seq 2000000 > b.txt", outputs: ["*"]}
  gen2: {kind: command, run: "seq 3000000 > c.txt; head -c 9000000 /dev/zero > z.bin", outputs: ["*"]}
  join:
    kind: command
    needs: [gen1, gen2]
    run: cat $SNAPBUILD_INPUTS/gen1/b.txt $SNAPBUILD_INPUTS/gen2/c.txt | sha256sum > sum.txt
    outputs: [sum.txt]
publish: {tag: "heavy:v"}
"""


def check_consistent(home: Path) -> None:
    store = Store(home)
    for d in store.blobs.digests():
        assert store.blobs.verify(d), f"visible blob {d} does not match its digest"
    _, broken = store.referenced()
    assert broken == [], f"cache entries pointing at missing data: {broken}"
    reg = home / "registry" / "heavy"
    if (reg / "index.json").exists():
        for m in json.loads((reg / "index.json").read_text())["manifests"]:
            manifest = json.loads((reg / "blobs" / "sha256" / m["digest"].split(":")[1]).read_bytes())
            for layer in [manifest["config"], *manifest["layers"]]:
                assert (reg / "blobs" / "sha256" / layer["digest"].split(":")[1]).exists()


def processes(where) -> list[int]:
    """PIDs of the processes whose /proc folder ``where(folder)`` accepts."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and where(d):
                pids.append(int(d.name))
        except OSError:  # gone meanwhile
            pass
    return pids


def working_in(home: Path) -> list[int]:
    return processes(lambda d: Path(os.readlink(d / "cwd")).is_relative_to(home))


def running(token: str, prefix: bytes = b"") -> list[int]:
    """PIDs of processes whose command line holds ``token`` (after ``prefix``, if given)."""
    return processes(lambda d: (prefix + token.encode()) in (d / "cmdline").read_bytes())


def left_after(find, timeout: float = 10) -> list[int]:
    """What ``find()`` still returns once it returns nothing, or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def start_build(path: Path, home: Path) -> subprocess.Popen:
    return subprocess.Popen([SNAPBUILD, "build", str(path), "--progress", "none", "-j", "2"],
                            env={**os.environ, "SNAPBUILD_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.integration
def test_sigkill_at_any_moment_leaves_a_consistent_store(recipe, tmp_path):
    path = recipe(HEAVY)
    # How long does a full build take here? Spread the kills over that window.
    probe_home = tmp_path / "probe"
    t0 = time.monotonic()
    proc = start_build(path, probe_home)
    assert proc.wait(timeout=300) == 0
    full = time.monotonic() - t0

    home = tmp_path / "home"
    kills = 0
    for i in range(8):
        proc = start_build(path, home)
        time.sleep(full * (i + 0.5) / 8)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the build (its commands run in sessions of their own)
            kills += 1
        proc.wait()
        assert left_after(lambda: working_in(home)) == [], "a command of the killed build is still running"
        check_consistent(home)
        # Start over from scratch for part of the sweep, so early phases are hit again.
        if i % 3 == 2:
            subprocess.run(["rm", "-rf", str(home)], check=True)
    assert kills >= 4, "the sweep should interrupt most builds"

    r = subprocess.run([SNAPBUILD, "build", str(path), "--json"], env={**os.environ, "SNAPBUILD_HOME": str(home)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tag"] == "heavy:v"
    v = subprocess.run([SNAPBUILD, "cache", "verify", "--json"], env={**os.environ, "SNAPBUILD_HOME": str(home)},
                       capture_output=True, text=True)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout
    check_consistent(home)
    gc = subprocess.run([SNAPBUILD, "cache", "gc", "--json"], env={**os.environ, "SNAPBUILD_HOME": str(home)},
                        capture_output=True, text=True)
    assert gc.returncode == 0
    assert not any((home / "tmp").iterdir()) and not any((home / "work").iterdir())


@pytest.mark.integration
def test_two_builds_on_one_store_build_each_step_once(recipe, tmp_path):
    counter = tmp_path / "runs.log"
    path = recipe(f"""
        name: twice
        steps:
          a: {{kind: command, run: "echo a >> {counter}; sleep 0.5; echo a > a.txt", outputs: [a.txt]}}
          b: {{kind: command, run: "echo b >> {counter}; sleep 0.5; echo b > b.txt", outputs: [b.txt]}}
          c: {{kind: command, needs: [a, b], run: "echo c >> {counter}; echo c > c.txt", outputs: [c.txt]}}
        publish: {{tag: "twice:v"}}
    """)
    home = tmp_path / "home"
    procs = [subprocess.Popen([SNAPBUILD, "build", str(path), "--json"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "SNAPBUILD_HOME": str(home)}) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(counter.read_text().split()) == ["a", "b", "c"], "each step must run exactly once"
    assert outs[0]["snapshot"] == outs[1]["snapshot"]
    statuses = sorted(s["status"] for o in outs for s in o["steps"])
    assert statuses.count("built") == 3 and statuses.count("cached") == 3
    assert Store(home).verify().ok


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_running_commands(recipe, tmp_path, sig):
    marker = tmp_path / "still-running"
    path = recipe(f"""
        name: slow
        steps:
          a: {{kind: command, run: "sleep 2; touch {marker}"}}
          b: {{kind: command, run: "sleep 2; touch {marker}"}}
    """)
    proc = subprocess.Popen([SNAPBUILD, "build", str(path), "--progress", "plain"], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SNAPBUILD_HOME": str(tmp_path / "home")})
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    time.sleep(2.5)
    assert not marker.exists(), "the commands of an interrupted build must be stopped"
    assert Store(tmp_path / "home").verify().ok


@pytest.mark.integration
@pytest.mark.parametrize("what", ["command", "warm-up server", "warm-up server in namespaces"])
def test_a_build_killed_with_sigkill_leaves_no_process_of_its_own_running(recipe, tmp_path, what):
    """Commands and warm-up servers run in sessions of their own (a timeout kills all they
    started), so killing the build's group does not reach them: a guard does."""
    token = f"{abs(hash((str(tmp_path), what))) % 10**6 + 10**6}.5"  # sleep's argument: this test's mark
    if what == "command":
        steps = f'a: {{kind: command, run: "sleep {token}"}}'
    else:
        isolation = ", isolation: namespaces" if what.endswith("namespaces") else ""
        steps = f"""
          server: {{kind: warmup, run: "sleep {token}", ready: {{http: "http://127.0.0.1:9/never", timeout: 300}}}}
          snap: {{kind: checkpoint, process: server{isolation}}}"""
    path = recipe(f"""
        name: killed
        steps:
          {steps}
    """)
    proc = start_build(path, tmp_path / "home")
    try:
        deadline = time.monotonic() + 60
        while not running(token, prefix=b"sleep\0"):  # the step's own process, not a launcher
            assert proc.poll() is None and time.monotonic() < deadline, "the step never started"
            time.sleep(0.05)
        time.sleep(0.3)  # the build tells its guard about a process moments after it exists
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert left_after(lambda: running(token)) == [], f"the killed build's {what} is still running"
    finally:
        for pid in running(token):
            os.kill(pid, signal.SIGKILL)
