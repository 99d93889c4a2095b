"""runtime.runfiles and schema.Runtime.run_files: which run folder files a tree holds,
and writing them back below a run folder as a snapshot from a registry may ask (the
real CRIU round trip is tests/integration/test_run_files.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from snapbuild.errors import SnapbuildError
from snapbuild.runtime import runfiles
from snapbuild.schema import Runtime, SchemaError

from tests.unit.test_schema import host_runtime


def test_held_finds_mapped_and_open_files_but_not_the_runners_own_nor_deleted_ones(tmp_path):
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    (run / "inputs").mkdir()
    for rel in ("cache/k.so", "cache/index", "cache/gone", "server.log", "inputs/w", "cache/unheld"):
        (run / rel).write_bytes(b"x" * 4096)
    code = ("import mmap, os, sys, time\n"
            "r = sys.argv[1]\n"
            "m = mmap.mmap(os.open(r + '/cache/k.so', os.O_RDONLY), 0, prot=mmap.PROT_READ)\n"
            "files = [open(r + '/' + p, 'rb') for p in ('cache/index', 'cache/gone', 'server.log', 'inputs/w')]\n"
            "os.unlink(r + '/cache/gone')\n"
            "print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        assert runfiles.held([proc.pid], run) == {"cache/k.so", "cache/index"}
    finally:
        proc.kill()
        proc.wait()


def test_put_back_writes_below_the_run_folder_only(tmp_path):
    src, run = tmp_path / "src", tmp_path / "run"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "k.so").write_bytes(b"K" * 10)
    files = [{"path": "a/b/k.so", "mode": 0o755, "size": 10}]
    [written] = runfiles.put_back(files, src, run)
    assert written.read_bytes() == b"K" * 10 and written.stat().st_mode & 0o777 == 0o755
    assert (run / "a").stat().st_mode & 0o777 == 0o755, "the folders it made are the server's to read"
    written.write_bytes(b"stale")
    runfiles.put_back(files, src, run)
    assert written.read_bytes() == b"K" * 10, "what is there is replaced"

    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "a" / "b" / "k.so").unlink()
    (run / "a" / "b").rmdir()
    os.symlink(outside, run / "a" / "b")
    with pytest.raises(SnapbuildError, match="is a symlink or not a folder"):
        runfiles.put_back(files, src, run)
    assert not list(outside.iterdir()), "nothing is written through a link"


@pytest.mark.parametrize("path, why", [
    ("../escape", "'..' component"),
    ("/etc/passwd", "is absolute"),
    ("server.log", "the runner's own"),
    ("inputs/app/x", "the runner's own"),
    ("a", "a file with another below it"),
])
def test_a_snapshot_names_only_plain_paths_below_the_run_folder(path, why):
    doc = {**host_runtime(), "format": 5,
           "run_files": [{"path": path, "mode": 0o644, "size": 1}, {"path": "a/b", "mode": 0o644, "size": 1}]}
    with pytest.raises(SchemaError, match=why):
        Runtime.from_json(doc)


def test_run_files_need_format_5_and_a_host_process():
    rec = [{"path": "vllm-cache/k.so", "mode": 0o755, "size": 10}]
    assert Runtime.from_json({**host_runtime(), "format": 5, "run_files": rec}).run_files == rec
    with pytest.raises(SchemaError, match="format 5"):
        Runtime.from_json({**host_runtime(), "format": 4, "run_files": rec})
