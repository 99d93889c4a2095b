"""Writing hostile trees out: no link followed, no setuid bit, nothing half-written.

The trees here are written by hand, the way a compromised registry would, not by
build_tree: each case is one thing an attacker would try.
"""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapbuild.errors import IntegrityError
from snapbuild.store.blobs import BlobStore
from snapbuild.store.chunks import CHUNK_SIZE, put_chunk
from snapbuild.store.fsutil import canonical_json
from snapbuild.store.securefs import check_name, safe_mode, unsafe_relpath
from snapbuild.store.tree import MEDIA_TYPE, check_tree, load_tree, materialize, tree_problem


@pytest.fixture
def blobs(tmp_path):
    return BlobStore(tmp_path / "store")


def file_entry(blobs, path, data=b"pwned\n", mode=0o644):
    chunks = [put_chunk(blobs, data)] if data else []
    return {"path": path, "type": "file", "mode": mode, "size": len(data), "chunks": chunks,
            "digest": "sha256:" + hashlib.sha256(data).hexdigest()}


def tree(*entries):
    return {"mediaType": MEDIA_TYPE, "entries": list(entries)}


def snapshot_of(root):
    """Every path below root with its type, mode and content: compared before and after."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            body = open(p, "rb").read() if stat.S_ISREG(st_.st_mode) else os.readlink(p) if stat.S_ISLNK(st_.st_mode) else None
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), body)
    return out


@pytest.fixture
def sentinel(tmp_path):
    s = tmp_path / "sentinel"
    s.mkdir()
    (s / "important.txt").write_text("keep me\n")
    return s


def test_symlink_parent_from_the_tree_is_refused_before_anything_is_written(blobs, tmp_path, sentinel):
    before = snapshot_of(sentinel)
    bad = tree({"path": "a", "type": "symlink", "target": str(sentinel)}, file_entry(blobs, "a/important.txt"))
    with pytest.raises(IntegrityError, match="'a/important.txt' is below 'a'"):
        materialize(blobs, bad, tmp_path / "out")
    assert snapshot_of(sentinel) == before
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_symlink_already_on_disk_is_not_followed(blobs, tmp_path, sentinel):
    """A checked tree still never writes through a link that was on disk: the
    temporary folder is fresh, and the Beneath walker refuses links it meets."""
    from snapbuild.store.securefs import Beneath, UnsafeDisk

    root = tmp_path / "root"
    root.mkdir()
    os.symlink(sentinel, root / "a")
    before = snapshot_of(sentinel)
    with Beneath(root) as disk:
        with pytest.raises(UnsafeDisk, match="symlink or not a folder"):
            disk.create_file("a/important.txt")
        # a link in the way of a file is replaced, never written through
        os.symlink(sentinel / "important.txt", root / "f")
        os.close(disk.create_file("f"))
    assert snapshot_of(sentinel) == before
    assert (root / "f").is_file() and not (root / "f").is_symlink()


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../x", "./a", "a//b", "", "a/./b", "a\0b"])
def test_unsafe_paths_are_refused(blobs, tmp_path, path):
    with pytest.raises(IntegrityError, match="not a safe relative path|refusing"):
        materialize(blobs, tree(file_entry(blobs, path)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicates_unsorted_and_entries_below_a_file(blobs):
    f = file_entry(blobs, "a")
    assert "duplicate" in tree_problem(tree({"path": "a", "type": "dir", "mode": 0o755}, f))
    assert "out of order" in tree_problem(tree(file_entry(blobs, "b"), file_entry(blobs, "a")))
    assert "is below 'a'" in tree_problem(tree(f, file_entry(blobs, "a/b")))
    assert "unknown type" in tree_problem(tree({"path": "dev", "type": "chardev", "mode": 0o666}))
    assert tree_problem(tree({"path": "a", "type": "dir", "mode": 0o755}, file_entry(blobs, "a/b"))) is None


def test_sizes_chunks_and_packs_must_add_up(blobs):
    e = file_entry(blobs, "f", b"x" * 100)
    assert tree_problem(tree(dict(e, size=99))) == "file 'f' has size 99, but its chunks add up to 100"
    big = dict(e, size=CHUNK_SIZE * 4, chunks=[{"enc": "zero", "size": CHUNK_SIZE * 4}])
    assert "chunks hold 1 to" in tree_problem(tree(big))  # a decompression bomb's size
    packed = dict(e, chunks=[dict(e["chunks"][0], offset=-1, length=10)])
    assert "invalid offset" in tree_problem(tree(packed))
    two = dict(e, size=200, chunks=[dict(e["chunks"][0], offset=0, length=10)] * 2)
    assert "only a small file of one chunk is packed" in tree_problem(tree(two))
    assert "invalid mode" in tree_problem(tree(dict(e, mode="4755")))
    assert "no valid digest" in tree_problem(tree(dict(e, digest="sha256:../../x")))


def test_setuid_setgid_and_sticky_bits_are_dropped(blobs, tmp_path):
    t = tree({"path": "d", "type": "dir", "mode": 0o1777},
             file_entry(blobs, "d/sgid", b"x", 0o2755), file_entry(blobs, "d/suid", b"#!/bin/sh\n", 0o4755))
    materialize(blobs, t, tmp_path / "out")
    assert stat.S_IMODE(os.stat(tmp_path / "out/d/suid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "out/d/sgid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "out/d").st_mode) == 0o777
    assert safe_mode(0o6755) == 0o755


def test_a_corrupt_chunk_leaves_nothing_behind(blobs, tmp_path):
    good = file_entry(blobs, "a", b"fine")
    bad = file_entry(blobs, "b", b"changed")
    bad["digest"] = "sha256:" + "0" * 64  # the content does not match
    bad["chunks"] = [dict(bad["chunks"][0], offset=0, length=len(b"changed"))]
    with pytest.raises(IntegrityError):
        materialize(blobs, tree(good, bad), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_load_tree_names_where_the_tree_comes_from(blobs):
    d = blobs.put(canonical_json(tree({"path": "..", "type": "dir", "mode": 0o755})))
    with pytest.raises(IntegrityError, match=r"snapshot demo:1, step app: tree sha256:\w+ entry '\.\.'"):
        load_tree(blobs, d, "snapshot demo:1, step app: tree")


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "", "x\0"])
def test_plain_names(name):
    with pytest.raises(IntegrityError, match="plain name"):
        check_name(name, "output")
    assert check_name("app.v1-2_x", "output") == "app.v1-2_x"


# -- property: any tree, however nested and linked, writes only below its destination --

_names = st.sampled_from(["a", "b", "..", ".", "c d", "x", "", "/"])
_paths = st.lists(_names, min_size=1, max_size=4).map("/".join)


@st.composite
def hostile_trees(draw, sentinel):
    entries = []
    for path in draw(st.lists(_paths, max_size=8)):
        kind = draw(st.sampled_from(["dir", "file", "symlink"]))
        if kind == "dir":
            entries.append({"path": path, "type": "dir", "mode": draw(st.integers(0, 0o7777))})
        elif kind == "file":
            entries.append({"path": path, "type": "file", "mode": draw(st.integers(0, 0o7777)), "size": 0,
                            "chunks": [], "digest": "sha256:" + hashlib.sha256(b"").hexdigest()})
        else:
            target = draw(st.sampled_from([str(sentinel), "..", "../..", "/", "a", str(sentinel / "important.txt")]))
            entries.append({"path": path, "type": "symlink", "target": target})
    if draw(st.booleans()):
        entries.sort(key=lambda e: e["path"])
    return tree(*entries)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_trees_never_write_outside_or_setuid(blobs, tmp_path, sentinel, data):
    t = data.draw(hostile_trees(sentinel))
    before = snapshot_of(sentinel)
    out = tmp_path / "out"
    try:
        materialize(blobs, t, out)
    except IntegrityError:
        assert tree_problem(t) is not None or not out.exists()
        assert not out.exists()
    else:
        assert tree_problem(t) is None
        written = snapshot_of(out)
        # exactly the tree's entries (and their implicit parents), nothing else
        assert {e["path"] for e in t["entries"]} <= set(written)
        assert all(mode & 0o7000 == 0 for kind, mode, _ in written.values() if kind != stat.S_IFLNK)
        check_tree(t)
    assert snapshot_of(sentinel) == before
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    if out.exists():
        import shutil

        shutil.rmtree(out)


def test_unsafe_relpath_reasons():
    assert unsafe_relpath("a/b") is None
    assert unsafe_relpath("a" * 256) and "longer" in unsafe_relpath("a" * 256)
