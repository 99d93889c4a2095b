"""runtime.shmfiles: which /dev/shm files a tree holds, and putting them back (a tmp
folder stands in for /dev/shm; the real one is in tests/integration/test_process_trees.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from snapbuild.errors import SnapbuildError
from snapbuild.runtime import shmfiles


def test_held_files_are_found_by_inode_and_moved_unless_another_process_holds_them(tmp_path):
    shm, dest = tmp_path / "shm", tmp_path / "dest"
    shm.mkdir()
    for name in ("mapped", "open", "deleted", "shared", "unrelated"):
        (shm / name).write_bytes(name.encode() * 100)
    code = ("import mmap, os, sys, time\n"
            "d = sys.argv[1]\n"
            "m = mmap.mmap(os.open(d + '/mapped', os.O_RDWR), 0)\n"
            "o = open(d + '/open', 'rb')\n"
            "x = open(d + '/deleted', 'rb'); os.link(d + '/deleted', d + '/link_remap.7'); os.unlink(d + '/deleted')\n"
            "s = open(d + '/shared', 'rb')\n"
            "print('ready', flush=True); time.sleep(60)\n")
    tree = subprocess.Popen([sys.executable, "-c", code, str(shm)], stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); time.sleep(60)",
                              str(shm / "shared")])
    try:
        assert tree.stdout.readline() == "ready\n"
        time.sleep(0.2)  # the other one has its file open too
        held = shmfiles.held_inodes([tree.pid], shm)
        tree.kill()
        tree.wait()
        got = shmfiles.collect(held, dest, shm)
    finally:
        other.kill()
        other.wait()
    assert [f["name"] for f in got] == ["link_remap.7", "mapped", "open", "shared"]
    assert (dest / "link_remap.7").read_bytes() == b"deleted" * 100
    assert sorted(p.name for p in shm.iterdir()) == ["shared", "unrelated"], \
        "a file another process holds, and one the tree never held, stay"


def test_put_back_replaces_stale_files_and_refuses_other_things(tmp_path):
    """What a restore writes into /dev/shm (a tmp folder here): a stale file of the same
    name is replaced, a link or folder there is an error, and nothing is left half done."""
    shm, src = tmp_path / "shm", tmp_path / "src"
    shm.mkdir()
    src.mkdir()
    for name, data in (("a", b"A" * 10), ("b", b"B")):
        (src / name).write_bytes(data)
    (shm / "a").write_bytes(b"stale")
    files = [{"name": "a", "mode": 0o600, "size": 10}, {"name": "b", "mode": 0o640, "size": 1}]
    written = shmfiles.put_back(files, src, shm)
    assert [p.name for p in written] == ["a", "b"] and (shm / "a").read_bytes() == b"A" * 10
    assert oct((shm / "b").stat().st_mode & 0o777) == oct(0o640)
    shmfiles.remove(written)
    os.symlink("/etc/passwd", shm / "b")
    with pytest.raises(SnapbuildError, match="something other than a file"):
        shmfiles.put_back(files, src, shm)
    assert not (shm / "a").exists(), "what was written before the refusal is taken back"
    assert os.readlink(shm / "b") == "/etc/passwd", "the link is left as it was"
