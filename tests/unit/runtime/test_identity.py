"""Process identity: a PID is believed only with its start time and this boot's id."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from snapbuild.runtime.identity import ProcessIdentity, boot_id, start_time


def fake_proc(root: Path, pid: int, comm: str, start: int, boot: str = "boot-a", state: str = "S") -> Path:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    rest = [state, "1", str(pid), str(pid)] + ["0"] * 15 + [str(start), "0"]
    (root / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(rest)}\n")
    (root / "sys/kernel/random").mkdir(parents=True, exist_ok=True)
    (root / "sys/kernel/random/boot_id").write_text(boot + "\n")
    return root


def test_the_start_time_is_field_22_even_when_the_name_holds_parentheses_and_spaces(tmp_path):
    proc = fake_proc(tmp_path, 4242, "evil) 1 2 (x", start=987654)
    assert start_time(4242, proc) == 987654
    assert start_time(4243, proc) is None, "no such process"


def test_a_zombie_has_no_start_time(tmp_path):
    proc = fake_proc(tmp_path, 7, "server", start=5, state="Z")
    assert start_time(7, proc) is None and ProcessIdentity.of(7, proc) is None


def test_an_identity_is_the_process_only_with_the_same_start_time_and_boot(tmp_path):
    proc = fake_proc(tmp_path, 100, "python3", start=500)
    ident = ProcessIdentity.of(100, proc)
    assert ident == ProcessIdentity(100, 500, "boot-a") and ident.alive(proc) and ident.why_not(proc) is None
    fake_proc(tmp_path, 100, "sleep", start=900)  # the PID went to another process
    assert not ident.alive(proc) and "another process" in ident.why_not(proc)
    fake_proc(tmp_path, 100, "python3", start=500, boot="boot-b")  # same numbers, after a reboot
    assert not ident.alive(proc) and "booted" in ident.why_not(proc)


def test_this_process_and_a_child_against_the_real_proc():
    me = ProcessIdentity.of(os.getpid())
    assert me is not None and me.alive() and me.boot == boot_id() and len(me.boot) == 36
    child = subprocess.Popen(["sleep", "30"])
    try:
        ident = ProcessIdentity.of(child.pid)
        assert ident.alive() and ident.start >= me.start
        assert not ProcessIdentity(child.pid, ident.start + 1, ident.boot).alive()
    finally:
        child.kill()
        child.wait()
    assert not ident.alive(), "gone once it exited"


def test_records_without_a_start_time_or_boot_are_never_believed():
    good = ProcessIdentity(1234, 99, "b").to_json()
    assert ProcessIdentity.from_json(good) == ProcessIdentity(1234, 99, "b")
    for bad in ({"pid": 1234}, {**good, "start": "99"}, {**good, "boot": ""}, {**good, "pid": 1},
                {**good, "pid": True}, [1234, 99, "b"], None):
        assert ProcessIdentity.from_json(bad) is None, bad
