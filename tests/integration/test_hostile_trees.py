"""Trees whose shape is the attack: 2,000 folders deep (within PATH_MAX), or one
400-byte chunk named 256 times so that a snapshot of kilobytes declares a gigabyte.

Forged by hand (test_hostile.Forge) into a file:// registry and pulled by the real
`snapbuild-runner` as a child process, whose wall time and peak memory (its rusage)
are measured and bounded: each is refused with its exit status and a message, no
traceback, and nothing half-written (no `.partial` folder) left anywhere.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapbuild.store.chunks import CHUNK_SIZE, put_chunk
from snapbuild.store.fsutil import walk
from test_hostile import Forge
from testkit import measured

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
MiB = 1 << 20
DEPTH = 2000  # "a/a/.../a": 3,999 bytes, within PATH_MAX


@dataclass
class Measured:
    code: int
    out: str
    err: str
    wall_s: float
    peak_rss: int  # bytes: the command's own peak resident size


def runner(*args, env: dict | None = None, timeout: float = 120, during=None) -> Measured:
    """Run `snapbuild-runner ARGS` as a child and measure it; ``during()`` is called
    every 10 ms while it runs (to sample what it does to a disk)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        code, wall, peak = measured([str(BIN / "snapbuild-runner"), *map(str, args)], env={**os.environ, **(env or {})},
                                    timeout=timeout, stdout=out, stderr=err, during=during)
        out.seek(0)
        err.seek(0)
        return Measured(code, out.read().decode(), err.read().decode(), wall, peak)


def partials(root: Path) -> list[str]:
    """`.partial` files and folders below ``root`` (walked without recursion: a tree
    left 2,000 deep would end pathlib's rglob)."""
    return [os.path.join(d, n) for d, dirs, files in walk(root) for n in dirs + files if n.endswith(".partial")]


def deep_tree(forge: Forge, depth: int = DEPTH) -> str:
    entries, path = [], ""
    for _ in range(depth):
        path = f"{path}/a" if path else "a"
        entries.append({"path": path, "type": "dir", "mode": 0o755})
    return forge.tree(*entries, forge.file(path + "/f"))


def one_chunk_many_times(forge: Forge, times: int = 256) -> str:
    """A 1 GiB file made of one 4 MiB chunk (a few hundred bytes of zstd) named ``times`` times."""
    data = b"A" * CHUNK_SIZE
    ref = put_chunk(forge.blobs, data)
    assert ref["enc"] == "zstd" and forge.blobs.size(ref["digest"]) < 1024
    h = hashlib.sha256()
    for _ in range(times):
        h.update(data)
    return forge.tree({"path": "big.bin", "type": "file", "mode": 0o644, "size": times * CHUNK_SIZE,
                       "digest": "sha256:" + h.hexdigest(), "chunks": [ref] * times})


@pytest.fixture
def forge(tmp_path):
    return Forge(tmp_path / "forge")


@pytest.mark.parametrize("path", ["pull", "restore"])
def test_a_tree_2000_folders_deep_is_refused_at_once_and_leaves_nothing(path, forge, tmp_path):
    url = f"file://{tmp_path / 'evil-registry'}"
    forge.publish(url, "evil", "1", forge.snapshot({"app": deep_tree(forge)}))
    dest = tmp_path / "dest"
    args = ["pull", "evil:1", "--registry", url, "--dest", dest] if path == "pull" else \
        ["restore", "evil:1", "--registry", url]
    r = runner(*args, env={"SNAPBUILD_HOME": str(tmp_path / "node")})
    assert r.code == 5, (r.code, r.err)
    assert "is 257 folders deep, past this node's limit (depth=256" in r.err and "TIP" in r.err, r.err
    assert "Traceback" not in r.err and "RecursionError" not in r.err
    assert partials(tmp_path) == [], "no .partial left"
    assert not dest.exists() or not any(dest.iterdir())
    # Before: minutes of CPU (a walk per level of every path), then a RecursionError.
    assert r.wall_s < 30, f"refused in {r.wall_s:.1f} s"
    assert r.peak_rss < 200 * MiB, f"peak memory {r.peak_rss / MiB:.0f} MiB"


def test_the_node_may_allow_deeper_trees_and_writes_and_removes_them_without_recursion(forge, tmp_path):
    """With SNAPBUILD_TREE_LIMITS raised, the same tree is written out (folder by folder,
    relative to its parent: its absolute path is past PATH_MAX) and `gc` of the store's
    temporary folders, like every cleanup, removes trees of any depth."""
    url = f"file://{tmp_path / 'evil-registry'}"
    forge.publish(url, "evil", "1", forge.snapshot({"app": deep_tree(forge)}))
    dest = tmp_path / "dest"
    r = runner("pull", "evil:1", "--registry", url, "--dest", dest,
               env={"SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_TREE_LIMITS": f"depth={DEPTH + 1}"})
    assert r.code == 0, r.err
    fd = os.open(dest / "app", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            sub = os.open("a", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
        assert os.read(os.open("f", os.O_RDONLY, dir_fd=fd), 100) == b"pwned\n"
    finally:
        os.close(fd)
    work = tmp_path / "node" / "work" / "left-behind"
    work.parent.mkdir(parents=True)
    os.rename(dest / "app", work)
    r = runner("gc", env={"SNAPBUILD_HOME": str(tmp_path / "node")})
    assert r.code == 0 and "Traceback" not in r.err, r.err
    assert not work.exists()
    r = runner("pull", "evil:1", "--registry", url, "--dest", dest,
               env={"SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_TREE_LIMITS": "depth=deep"})
    assert r.code == 2 and "SNAPBUILD_TREE_LIMITS='depth=deep'" in r.err, r.err


def test_the_node_settings_file_raises_the_limit_as_the_variable_does(forge, tmp_path):
    """tree_limits in node.toml (--config, or $SNAPBUILD_CONFIG) lets the deep tree in
    like SNAPBUILD_TREE_LIMITS above; the variable still beats the file. (300 deep:
    past the default 256, and shallow enough for pytest to clean up.)"""
    url = f"file://{tmp_path / 'evil-registry'}"
    forge.publish(url, "evil", "1", forge.snapshot({"app": deep_tree(forge, 300)}))
    node = tmp_path / "node.toml"
    node.write_text('tree_limits = "depth=301"\n')
    home = {"SNAPBUILD_HOME": str(tmp_path / "node")}
    r = runner("--config", node, "pull", "evil:1", "--registry", url, "--dest", tmp_path / "one", env=home)
    assert r.code == 0, r.err
    assert (tmp_path / "one" / "app" / "a").is_dir()
    r = runner("pull", "evil:1", "--registry", url, "--dest", tmp_path / "two",
               env={**home, "SNAPBUILD_CONFIG": str(node), "SNAPBUILD_TREE_LIMITS": "depth=256"})
    assert r.code == 5 and "past this node's limit (depth=256" in r.err, (r.code, r.err)


def test_a_chunk_named_256_times_past_the_byte_limit_is_refused_before_anything_is_written(forge, tmp_path):
    url = f"file://{tmp_path / 'evil-registry'}"
    manifest = forge.snapshot({"app": one_chunk_many_times(forge)})
    forge.publish(url, "evil", "1", manifest)
    assert sum(forge.blobs.size(d) for d in forge.blobs.digests()) < 64 << 10, "a snapshot of kilobytes"
    dest = tmp_path / "dest"
    r = runner("pull", "evil:1", "--registry", url, "--dest", dest,
               env={"SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_TREE_LIMITS": "bytes=512M"})
    assert r.code == 5, (r.code, r.err)
    assert "declares more than 512.0 MiB of files (at 'big.bin'), past this node's limit (bytes=536870912" in r.err
    assert "Traceback" not in r.err and partials(tmp_path) == []
    assert not dest.exists() or not any(dest.iterdir())
    assert r.wall_s < 30 and r.peak_rss < 200 * MiB, (r.wall_s, r.peak_rss / MiB)


def test_a_tree_bigger_than_the_free_space_is_refused_before_writing(forge, tmp_path):
    """The same gigabyte, within the byte limit, into a 64 MiB file system: refused
    before the first byte, the disk's use sampled all along."""
    url = f"file://{tmp_path / 'evil-registry'}"
    forge.publish(url, "evil", "1", forge.snapshot({"app": one_chunk_many_times(forge)}))
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        def used() -> int:
            st = os.statvfs(disk)
            return (st.f_blocks - st.f_bfree) * st.f_frsize

        before, peak = used(), [0]
        r = runner("pull", "evil:1", "--registry", url, "--dest", disk / "dest",
                   env={"SNAPBUILD_HOME": str(tmp_path / "node")},
                   during=lambda: peak.__setitem__(0, max(peak[0], used())))
        assert r.code == 11, (r.code, r.err)
        assert f"to {disk / 'dest'} needs 1.0 GiB but" in r.err and "is free on that file system" in r.err, r.err
        assert "Traceback" not in r.err and "TIP" in r.err
        assert peak[0] - before < 1 * MiB, f"{(peak[0] - before) / MiB:.1f} MiB were written first"
        assert partials(disk) == [] and not any((disk / "dest").iterdir())
        assert r.wall_s < 30 and r.peak_rss < 200 * MiB, (r.wall_s, r.peak_rss / MiB)
    finally:
        subprocess.run(["umount", "-l", str(disk)])
