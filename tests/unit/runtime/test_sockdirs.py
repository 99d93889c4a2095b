"""runtime.sockdirs: which socket folders a restore may make, and making them safely."""

from __future__ import annotations

import os
import socket

import pytest

from snapbuild.errors import SnapbuildError
from snapbuild.runtime import sockdirs


@pytest.mark.parametrize("folder,run_dir,expected", [
    ("/tmp/zmq-1", "/r/run/x", ("/tmp", "zmq-1")),
    ("/tmp", "/r/run/x", ("/tmp", "")),
    ("/r/run/x/ipc", "/r/run/x", ("/r/run/x", "ipc")),
    ("/etc/ipc", "/r/run/x", None),
    ("/tmp/../etc", "/r/run/x", None),
    ("/tmpfoo", "/r/run/x", None),
    ("tmp/x", "/r/run/x", None),
])
def test_only_scratch_folders_and_the_run_folder_qualify(folder, run_dir, expected):
    assert sockdirs.place(folder, run_dir) == expected


def test_bound_dirs_finds_this_process_s_path_sockets(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    (tmp_path / "ipc").mkdir()
    s.bind(str(tmp_path / "ipc" / "in"))
    s.listen()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0snapbuild-test-abstract")
    try:
        assert str(tmp_path / "ipc") in sockdirs.bound_dirs([os.getpid()])
        assert not any("abstract" in d for d in sockdirs.bound_dirs([os.getpid()]))
    finally:
        s.close()
        abstract.close()


def test_recreate_makes_missing_folders_and_never_follows_a_link(tmp_path):
    run_dir = str(tmp_path)
    sockdirs.recreate([f"{run_dir}/a/b"], run_dir)
    assert (tmp_path / "a" / "b").is_dir() and oct((tmp_path / "a" / "b").stat().st_mode & 0o777) == oct(0o755)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(SnapbuildError, match="cannot make the server's socket folder"):
        sockdirs.recreate([f"{run_dir}/link/c"], run_dir)
    assert not (tmp_path / "elsewhere" / "c").exists()
    with pytest.raises(SnapbuildError, match="not a scratch folder"):
        sockdirs.recreate(["/etc/x"], run_dir)
