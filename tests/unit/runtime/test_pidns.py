"""The PID namespace a host-process restore runs in (snapbuild/runtime/pidns.py), driven
with a shell in place of ``criu restore -d``: the shell starts a detached process,
writes its PID (the namespace's number) where CRIU writes its pidfile, and exits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapbuild.runtime import pidns, process

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root")

DETACH = 'setsid sh -c "{body}" </dev/null >/dev/null 2>&1 & echo $! > "$0"'  # no pipe of ours held


def launch(pidfile: Path, body: str, rc: int = 0) -> subprocess.CompletedProcess:
    script = DETACH.format(body=body) + f"; exit {rc}"
    return subprocess.run(pidns.command(str(pidfile), ["sh", "-c", script, str(pidfile)]),
                          capture_output=True, text=True, timeout=30)


def test_the_restored_root_has_its_namespace_number_and_the_pidfile_says_this_machines(tmp_path):
    pidfile = tmp_path / "restore.pid"
    r = launch(pidfile, "exec sleep 60")
    assert r.returncode == 0, r.stderr
    host = int(pidfile.read_text())
    try:
        assert process.alive(host) and Path(f"/proc/{host}/cmdline").read_bytes() == b"sleep\x0060\x00"
        assert process.ns_pid(host) not in (None, host), "a number of its own, in its namespace"
        keeper = process._ppid(host)
        assert process.ns_pid(keeper) == 1, "its parent is the namespace's PID 1"
        # its /proc is its namespace's: the keeper and itself, by their numbers there
        seen = subprocess.run(["nsenter", "-t", str(host), "-m", "ls", "/proc"],
                              capture_output=True, text=True, timeout=10).stdout.split()
        assert {e for e in seen if e.isdigit()} == {"1", str(process.ns_pid(host))}, seen
    finally:
        assert process.stop(host)
    assert process.wait_gone([keeper], timeout=5), "the keeper exits with the server it kept"


def test_a_failed_command_passes_its_status_on_and_leaves_nothing(tmp_path):
    pidfile = tmp_path / "restore.pid"
    r = launch(pidfile, "exec sleep 59.25", rc=3)
    assert r.returncode == 3
    assert pidfile.read_text().strip().isdigit(), "the namespace's number: not rewritten on failure"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", "sleep 59.25"]).returncode == 0:
        time.sleep(0.05)
    assert subprocess.run(["pgrep", "-f", "sleep 59.25"]).returncode == 1, "the namespace ended, its process too"


def test_a_subreaper_collects_the_keeper_of_a_server_that_exited(tmp_path):
    """The agent adopts orphans (PR_SET_CHILD_SUBREAPER): a server that exits on its
    own leaves its keeper as the agent's zombie, which reap_namespace_inits collects."""
    code = f"""
import subprocess, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})
from snapbuild.runtime import pidns, process
assert process.become_subreaper()
pf = {str(tmp_path / 'restore.pid')!r}
script = 'setsid sh -c "sleep 0.3" </dev/null >/dev/null 2>&1 & echo $! > "$0"'
assert subprocess.run(pidns.command(pf, ["sh", "-c", script, pf])).returncode == 0
time.sleep(1.5)
zombies = lambda: [c for c in open("/proc/self/task/%d/children" % __import__("os").getpid()).read().split()
                   if process._status(int(c)).get("State", "").strip().startswith("Z")]
before = zombies()
process.reap_namespace_inits()
print(len(before), len(zombies()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0"], out.stdout
