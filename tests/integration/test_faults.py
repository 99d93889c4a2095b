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
            os.killpg(proc.pid, signal.SIGKILL)  # the build and the commands it started
            kills += 1
        proc.wait()
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
