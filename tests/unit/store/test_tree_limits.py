"""Trees of any shape: the node's limits (depth, entries, bytes), and walking, writing
and removing folders deeper than Python's recursion limit."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from snapbuild.errors import IntegrityError, UsageError
from snapbuild.store.blobs import BlobStore
from snapbuild.store.chunks import CHUNK_SIZE, put_chunk
from snapbuild.store.fsutil import remove_tree, walk
from snapbuild.store.tree import (DEFAULT_LIMITS, LIMITS_ENV, MEDIA_TYPE, TreeLimits, disk_need, materialize,
                                  tree_limits, tree_problem)

DEEP = sys.getrecursionlimit() + 500  # what recursion per level cannot walk


@pytest.fixture
def blobs(tmp_path):
    return BlobStore(tmp_path / "store")


def tree(*entries):
    return {"mediaType": MEDIA_TYPE, "entries": list(entries)}


def file_entry(blobs, path, data=b"x"):
    return {"path": path, "type": "file", "mode": 0o644, "size": len(data), "chunks": [put_chunk(blobs, data)],
            "digest": "sha256:" + hashlib.sha256(data).hexdigest()}


def chain(depth: int) -> list[str]:
    return ["/".join(["d"] * i) for i in range(1, depth + 1)]


def test_limits_default_and_are_set_by_the_node(monkeypatch):
    monkeypatch.delenv(LIMITS_ENV, raising=False)
    assert tree_limits() == DEFAULT_LIMITS == TreeLimits(depth=256, entries=1_000_000, bytes=1 << 40)
    monkeypatch.setenv(LIMITS_ENV, " depth=64, bytes=500G ")
    assert tree_limits() == TreeLimits(depth=64, entries=1_000_000, bytes=500 << 30)
    monkeypatch.setenv(LIMITS_ENV, "entries=10,bytes=4KiB")
    assert tree_limits() == TreeLimits(depth=256, entries=10, bytes=4096)
    for bad in ("depth", "depth=0", "deep=3", "bytes=lots", "depth=-1"):
        monkeypatch.setenv(LIMITS_ENV, bad)
        with pytest.raises(UsageError, match="is not KEY=NUMBER with KEY depth, entries or bytes"):
            tree_limits()


def test_a_path_deeper_than_the_limit_is_refused_by_its_first_entry_that_deep(blobs):
    t = tree(*({"path": p, "type": "dir"} for p in chain(10)))
    assert tree_problem(t, TreeLimits(depth=10)) is None
    why = tree_problem(t, TreeLimits(depth=9))
    assert why == ("entry 'd/d/d/d/d/d/d/d/d/d' is 10 folders deep, past this node's limit "
                   f"(depth=9; {LIMITS_ENV} sets it)")


def test_entries_count_the_folders_paths_imply(blobs):
    f = file_entry(blobs, "a/b/c/d/e")  # five inodes: four folders and a file
    assert tree_problem(tree(f), TreeLimits(entries=5)) is None
    assert "has more than 4 entries (the folders its paths imply included)" in tree_problem(tree(f),
                                                                                           TreeLimits(entries=4))
    many = tree(*(file_entry(blobs, f"f{i:03}") for i in range(11)))
    assert tree_problem(many, TreeLimits(entries=10)).startswith("has 11 entries, past this node's limit")


def test_declared_bytes_past_the_limit_are_refused_however_few_chunks_hold_them(blobs):
    ref = put_chunk(blobs, b"A" * CHUNK_SIZE)
    big = {"path": "big", "type": "file", "mode": 0o644, "size": 256 * CHUNK_SIZE, "chunks": [ref] * 256,
           "digest": "sha256:" + "0" * 64}
    assert tree_problem(tree(big), TreeLimits(bytes=1 << 30)) is None
    assert tree_problem(tree(big), TreeLimits(bytes=(1 << 30) - 1)).startswith(
        "declares more than 1024.0 MiB of files (at 'big'), past this node's limit (bytes=1073741823")


def test_disk_need_counts_data_but_holes_and_every_inode(blobs):
    hole = {"path": "d/sparse", "type": "file", "mode": 0o644, "size": CHUNK_SIZE,
            "chunks": [{"enc": "zero", "size": CHUNK_SIZE}], "digest": "sha256:" + "0" * 64}
    t = tree({"path": "d", "type": "dir"}, hole, file_entry(blobs, "d/e/f", b"x" * 5000),
             {"path": "d/e/link", "type": "symlink", "target": "f"})
    need, inodes = disk_need(t)
    assert need == 8192 + 2 * 4096 and inodes == 5  # d, d/e, two files, one link


def test_the_check_is_linear_in_the_tree_whatever_its_depth(blobs):
    """Each folder a path implies is looked at once: below a file 2,000 levels up, the
    entry is refused by name, and a deep legal tree passes."""
    deep = chain(2000)
    ok = tree(*({"path": p, "type": "dir"} for p in deep))
    assert tree_problem(ok, TreeLimits(depth=2000)) is None
    under = tree(file_entry(blobs, "d"), file_entry(blobs, deep[-1]))
    assert tree_problem(under, TreeLimits(depth=2000)) == f"entry {deep[-1]!r} is below 'd', which is not a folder"


def test_a_tree_deeper_than_the_recursion_limit_is_written_walked_and_removed(blobs, tmp_path, monkeypatch):
    monkeypatch.setenv(LIMITS_ENV, f"depth={DEEP + 1}")
    paths = chain(DEEP)
    t = tree(*({"path": p, "type": "dir"} for p in paths), file_entry(blobs, paths[-1] + "/f", b"deep"))
    dest = tmp_path / "out"
    materialize(blobs, t, dest)
    found = [os.path.relpath(os.path.join(d, n), dest) for d, dirs, files in walk(dest) for n in dirs + files]
    assert found == paths + [paths[-1] + "/f"]
    remove_tree(dest)
    assert not dest.exists() and os.listdir(tmp_path) == ["store"]


def test_walk_is_os_walk_without_recursion(tmp_path):
    for p in ("a/b/c", "a/d", "e"):
        (tmp_path / p).mkdir(parents=True)
    for p in ("a/f", "a/b/g", "h"):
        (tmp_path / p).write_text("x")
    os.symlink(tmp_path / "a", tmp_path / "link")  # listed as a folder, not entered
    assert list(walk(tmp_path)) == list(os.walk(tmp_path))
    pruned = []
    for d, dirs, _ in walk(tmp_path):
        dirs[:] = [x for x in dirs if x != "a"]
        pruned.append(os.path.relpath(d, tmp_path))
    assert sorted(pruned) == [".", "e"]


def test_remove_tree_past_path_max_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep me\n")
    top = tmp_path / "top"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1200):  # 1,200 x "long/": past PATH_MAX from the root
        os.mkdir("long", dir_fd=fd)
        sub = os.open("long", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.symlink(outside, "escape", dir_fd=sub)
        os.close(fd)
        fd = sub
    os.mkdir("ro", 0o500, dir_fd=fd)  # a read-only folder, with a file inside
    os.close(fd)
    remove_tree(top)
    assert not top.exists() and (outside / "keep").read_text() == "keep me\n"
    remove_tree(top)  # gone already: no error
    (tmp_path / "file").write_text("x")
    os.symlink(outside, tmp_path / "link")
    remove_tree(tmp_path / "file")
    remove_tree(tmp_path / "link")
    assert sorted(os.listdir(tmp_path)) == ["outside"] and (outside / "keep").exists()


def test_remove_tree_raises_unless_told_to_ignore(tmp_path, monkeypatch):
    (tmp_path / "t" / "a").mkdir(parents=True)
    (tmp_path / "t" / "a" / "f").write_text("x")
    real = os.unlink

    def refuse(name, *, dir_fd=None):
        if name == "f":
            raise PermissionError(13, "no", name)
        return real(name, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(PermissionError):
        remove_tree(tmp_path / "t")
    remove_tree(tmp_path / "t", ignore_errors=True)
    assert os.listdir(tmp_path / "t" / "a") == ["f"], "what can be removed goes; the rest stays"


def test_a_refused_tree_is_refused_before_the_destination_is_touched(blobs, tmp_path, monkeypatch):
    monkeypatch.setenv(LIMITS_ENV, "depth=3")
    t = tree(*({"path": p, "type": "dir"} for p in chain(4)))
    with pytest.raises(IntegrityError, match="is 4 folders deep"):
        materialize(blobs, t, tmp_path / "out" / "app")
    assert not (tmp_path / "out").exists()
