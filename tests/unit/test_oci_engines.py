"""The command lines the OCI engines run, checked with a stand-in binary that records
its arguments (the real runc is exercised in tests/integration/test_containers.py;
runsc cannot be installed on these machines, so its flags are checked here)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from snapbuild.engines.oci import OciEngine, OciRuntimeError, RunscEngine


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """``fake(name, exit=0)``: a binary on PATH that appends its argv to calls.jsonl."""
    bindir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bindir.mkdir()

    def make(name: str, exit: int = 0) -> Path:
        script = bindir / name
        lines = ["#!/usr/bin/env python3", "import json, sys",
                 f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')"]
        if exit:
            lines.append("sys.stderr.write('it went wrong\\n')")
        script.write_text("\n".join(lines + [f"sys.exit({exit})", ""]))
        script.chmod(0o755)
        return calls

    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return make


def recorded(calls: Path) -> list[list[str]]:
    return [json.loads(line) for line in calls.read_text().splitlines()]


def test_runsc_flags_follow_the_recipe_options(fake, tmp_path):
    calls = fake("runsc")
    e = RunscEngine()
    opts = {"compression": "flate-best-speed", "direct": True, "background": True, "nvproxy": True}
    e.run(tmp_path / "b", "c1", options=opts)
    e.checkpoint("c1", tmp_path / "img", tmp_path / "work", options=opts)
    e.restore(tmp_path / "b", "c2", tmp_path / "img", tmp_path / "work", options=opts)
    e.checkpoint("c3", tmp_path / "img", tmp_path / "work")
    run, ckpt, restore, plain = recorded(calls)
    assert run == ["--nvproxy=true", "run", "--detach", "--bundle", str(tmp_path / "b"), "c1"]
    assert ckpt == ["--nvproxy=true", "checkpoint", f"--image-path={tmp_path / 'img'}",
                    "--compression=flate-best-speed", "--direct=true", "c1"]
    assert restore == ["--nvproxy=true", "restore", f"--image-path={tmp_path / 'img'}", "--detach",
                       "--direct=true", "--background=true", "--bundle", str(tmp_path / "b"), "c2"]
    assert plain == ["checkpoint", f"--image-path={tmp_path / 'img'}", "--compression=none", "c3"]


def test_runc_commands_and_a_failure_with_its_message(fake, tmp_path):
    calls = fake("runc")
    e = OciEngine()
    e.checkpoint("c1", tmp_path / "img", tmp_path / "work")
    e.restore(tmp_path / "b", "c1", tmp_path / "img", tmp_path / "work")
    assert recorded(calls) == [
        ["checkpoint", "--image-path", str(tmp_path / "img"), "--work-path", str(tmp_path / "work"), "c1"],
        ["restore", "--detach", "--image-path", str(tmp_path / "img"), "--work-path", str(tmp_path / "work"),
         "--bundle", str(tmp_path / "b"), "c1"]]
    fake("runc", exit=1)
    with pytest.raises(OciRuntimeError, match="runc restore failed \\(exit 1\\):\nit went wrong"):
        e.restore(tmp_path / "b", "c1", tmp_path / "img", tmp_path / "work2")


def test_a_missing_runtime_says_how_to_get_it(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(Exception, match="runsc is not installed") as e:
        RunscEngine().check()
    assert "gVisor" in e.value.hint
    assert shutil.which("runsc") is None


def test_criu_failures_it_cannot_get_past_are_put_in_words():
    from snapbuild.engines import criu

    what, change = criu.explain("Error (criu/sk-unix.c:874): unix: External socket is used. "
                                "Consider using --ext-unix-sk option.")
    assert "unix socket connected to a process outside its tree" in what and "after_restore" in change
    assert criu.explain("Error (criu/files-reg.c:1122): Can't open file: No such file") is None
