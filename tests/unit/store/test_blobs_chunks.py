"""Blobs, chunks and trees: verified reads, zstd-or-raw, holes, packs, determinism."""

from __future__ import annotations

import os

import pytest

from snapbuild.errors import IntegrityError, NotFound
from snapbuild.store.blobs import BlobStore, digest_bytes
from snapbuild.store import chunks
from snapbuild.store.chunks import CHUNK_SIZE, PACK_BELOW, PACK_MEDIA_TYPE, get_chunk, media_type, put_chunk
from snapbuild.store.tree import tree_blobs
from snapbuild.store.tree import build_tree, load_tree, materialize, walk


@pytest.fixture
def blobs(tmp_path):
    return BlobStore(tmp_path / "store")


def flip_byte(path, offset=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_put_get_roundtrip_and_dedup(blobs):
    d = blobs.put(b"hello")
    assert d == digest_bytes(b"hello") and blobs.get(d) == b"hello"
    assert blobs.put(b"hello") == d
    assert list(blobs.digests()) == [d]
    assert not list((blobs.root / "tmp").iterdir()), "no temp file may be left behind"


def test_flipped_byte_is_detected(blobs):
    d = blobs.put(b"some important bytes")
    flip_byte(blobs.path(d), 3)
    with pytest.raises(IntegrityError, match="corrupt"):
        blobs.get(d)
    assert not blobs.verify(d)


def test_missing_blob(blobs):
    with pytest.raises(NotFound):
        blobs.get(digest_bytes(b"never stored"))


def test_chunk_encodings(blobs):
    text = b"abc" * 100_000
    noise = os.urandom(100_000)
    zeros = bytes(CHUNK_SIZE)
    refs = [put_chunk(blobs, x) for x in (text, noise, zeros)]
    assert [r["enc"] for r in refs] == ["zstd", "raw", "zero"]
    assert blobs.size(refs[0]["digest"]) < len(text) // 10
    assert blobs.size(refs[1]["digest"]) == len(noise)
    assert "digest" not in refs[2]
    assert [get_chunk(blobs, r) for r in refs] == [text, noise, zeros]


def test_corrupt_compressed_chunk_is_refused(blobs):
    ref = put_chunk(blobs, b"abc" * 100_000)
    flip_byte(blobs.path(ref["digest"]), 10)
    with pytest.raises(IntegrityError):
        get_chunk(blobs, ref)


def make_tree(root):
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "run.sh", 0o755)
    (root / "empty").mkdir()
    (root / "big.bin").write_bytes(os.urandom(CHUNK_SIZE + 123))
    with open(root / "sparse.img", "wb") as f:  # 8 MiB hole then data
        f.seek(2 * CHUNK_SIZE)
        f.write(b"tail")
    os.symlink("bin/run.sh", root / "link")


def test_tree_roundtrip_keeps_content_modes_links_and_holes(blobs, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    digest, tree = build_tree(blobs, walk(src))
    sparse = next(e for e in tree["entries"] if e["path"] == "sparse.img")
    assert [c["enc"] for c in sparse["chunks"]] == ["zero", "zero", "raw"]  # 4 bytes do not compress
    small = next(e for e in tree["entries"] if e["path"] == "bin/run.sh")
    assert "offset" in small["chunks"][0], "a small file is packed"
    out = tmp_path / "out"
    materialize(blobs, load_tree(blobs, digest), out)
    for rel in ("bin/run.sh", "big.bin", "sparse.img"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert os.stat(out / "bin/run.sh").st_mode & 0o777 == 0o755
    assert (out / "empty").is_dir()
    assert os.readlink(out / "link") == "bin/run.sh"
    assert os.stat(out / "sparse.img").st_blocks * 512 < CHUNK_SIZE, "holes must stay holes"


def test_tree_digest_is_deterministic(blobs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "x").write_text("same")
    os.utime(b / "x", (1, 1))
    assert build_tree(blobs, walk(a))[0] == build_tree(blobs, walk(b))[0]


def test_unsafe_tree_paths_are_refused(blobs, tmp_path):
    (tmp_path / "f").write_text("x")
    for bad in ("../escape", "/abs", ""):
        with pytest.raises(IntegrityError):
            build_tree(blobs, [(bad, tmp_path / "f")])


def _many_small_files(root, n, seed=0):
    import random

    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = "".join(rnd.choice("abcdefgh \n") for _ in range(rnd.randint(2000, 30000)))
        (root / f"mod{i:04d}.py").write_text(text)
    (root / "big.bin").write_bytes(os.urandom(PACK_BELOW + 1))  # not packed
    (root / "zeros").write_bytes(bytes(1000))  # a hole, in no pack
    (root / "empty").write_bytes(b"")


def test_small_files_share_few_pack_blobs_and_come_back_verified(blobs, tmp_path):
    src = tmp_path / "src"
    _many_small_files(src, 400)
    digest, tree = build_tree(blobs, walk(src))
    files = [e for e in tree["entries"] if e["type"] == "file"]
    packed = [e for e in files if e["chunks"] and "offset" in e["chunks"][0]]
    assert len(packed) == 400
    packs = {e["chunks"][0]["digest"] for e in packed}
    assert 1 < len(packs) < 40, f"400 files of ~8 KiB stored compressed in {len(packs)} packs"
    assert len(list(tree_blobs(tree))) == len(set(tree_blobs(tree))), "each blob listed once"
    assert {media_type(e["chunks"][0]) for e in packed} == {PACK_MEDIA_TYPE}
    by_path = {e["path"]: e for e in files}
    assert [c["enc"] for c in by_path["zeros"]["chunks"]] == ["zero"]
    assert by_path["empty"]["chunks"] == [] and "offset" not in by_path["big.bin"]["chunks"][0]
    out = tmp_path / "out"
    materialize(blobs, load_tree(blobs, digest), out)
    for e in files:
        assert (out / e["path"]).read_bytes() == (src / e["path"]).read_bytes(), e["path"]


def test_pack_boundaries_follow_content_so_one_change_restores_one_pack(blobs, tmp_path, monkeypatch):
    # Smaller packs than the defaults, so that 400 small files make many of them.
    monkeypatch.setattr(chunks, "PACK_MIN", 16 << 10)
    monkeypatch.setattr(chunks, "PACK_CUT_BITS", 4)
    src = tmp_path / "src"
    _many_small_files(src, 400)
    _, first = build_tree(blobs, walk(src))
    assert len(set(tree_blobs(first))) > 10
    (src / "mod0200.py").write_text("changed")
    (src / "mod0000a.py").write_text("a new file, in the first pack")
    _, second = build_tree(blobs, walk(src))
    new = set(tree_blobs(second)) - set(tree_blobs(first))
    # The packs holding the changed and the added file are new; one more each at most,
    # when the file's new digest moves a pack boundary. Every other pack is reused.
    assert 2 <= len(new) <= 4, len(new)


def test_corrupt_packed_file_is_refused_with_its_pack_named(blobs, tmp_path):
    src = tmp_path / "src"
    _many_small_files(src, 20)
    digest, tree = build_tree(blobs, walk(src))
    entry = next(e for e in tree["entries"] if e["path"] == "mod0003.py")
    ref = entry["chunks"][0]
    flip_byte(blobs.path(ref["digest"]), ref["offset"] + ref["length"] // 2)
    with pytest.raises(IntegrityError, match="pack"):
        chunks.read_file(blobs, entry)
    with pytest.raises(IntegrityError):
        materialize(blobs, load_tree(blobs, digest), tmp_path / "out")
    with pytest.raises(ValueError, match="digest"):
        get_chunk(blobs, ref)  # a slice is never read unchecked
