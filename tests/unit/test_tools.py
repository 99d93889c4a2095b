"""External tools run with a time limit; a hung one is killed with everything it started."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from snapbuild import tools
from snapbuild.engines.criu import CriuError
from snapbuild.errors import SnapbuildError


def test_a_hung_tool_and_its_children_are_killed_at_the_limit(tmp_path):
    pidfile = tmp_path / "child.pid"
    t = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        # the grandchild holds stdout open: plain subprocess.run would wait for it for ever
        tools.run_killing_group(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], timeout=0.5)
    assert time.monotonic() - t < 10
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}"), "the tool's child went with it"


def test_run_names_the_tool_the_job_the_limit_and_the_knob(monkeypatch):
    monkeypatch.setenv("SNAPBUILD_CRIU_TIMEOUT", "0.3")
    assert tools.limit("criu") == 0.3
    with pytest.raises(CriuError) as e:
        tools.run(["sleep", "30"], tool="criu", what="criu restore", error=CriuError)
    assert "criu restore did not finish within 0.3 s" in e.value.message
    assert "SNAPBUILD_CRIU_TIMEOUT" in e.value.hint and e.value.exit_code == 8


def test_limits_default_and_ignore_a_bad_override(monkeypatch):
    monkeypatch.setenv("SNAPBUILD_MKFS_EROFS_TIMEOUT", "soon")
    assert tools.limit("mkfs.erofs") == tools.LIMITS["mkfs.erofs"]
    assert tools.env_key("mkfs.erofs") == "SNAPBUILD_MKFS_EROFS_TIMEOUT"
    assert tools.limit("some-new-tool") == tools.DEFAULT_LIMIT


def test_a_missing_tool_is_an_error_with_the_hint():
    with pytest.raises(SnapbuildError) as e:
        tools.run(["/nonexistent/mkfs.erofs", "x"], what="mkfs.erofs of x", hint="apt-get install erofs-utils")
    assert "is not installed" in e.value.message and e.value.hint == "apt-get install erofs-utils"


def test_output_and_status_come_back_as_subprocess_run_gives_them():
    r = tools.run(["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = tools.run_killing_group(["cat"], input="fed", timeout=10)
    assert r.stdout == "fed"


OWNER = """
import subprocess, sys, time
from snapbuild.tools import OrphanGuard
work = subprocess.Popen(["bash", "-c", "sleep 300 & echo $! > {pidfile}; wait"], start_new_session=True)
guard = OrphanGuard(work.pid)
{then}
print("ready", flush=True)
time.sleep(300)
"""


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("released", [False, True])
def test_an_owner_killed_with_sigkill_takes_its_guarded_group_with_it(tmp_path, released):
    import signal
    import sys

    pidfile = tmp_path / "grandchild.pid"
    owner = subprocess.Popen([sys.executable, "-c", OWNER.format(pidfile=pidfile,
                                                                then="guard.release()" if released else "")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        grandchild = int(pidfile.read_text())
        owner.send_signal(signal.SIGKILL)  # no handler, no finally: only the kernel closes its pipe
        owner.wait()
        if released:  # a released guard signals nothing, however its owner ends
            time.sleep(0.5)
            assert os.path.exists(f"/proc/{grandchild}")
            os.kill(grandchild, signal.SIGKILL)
        else:
            assert _gone(grandchild), "the guarded group outlived the process that started it"
    finally:
        owner.kill()
