"""runtime.shmfiles copies only the data of a file: a 256 MiB shared-memory block that
holds three pages costs three pages to carry and to write back (vLLM's psm_* files:
400 MiB apparent, 92 KiB of data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapbuild.runtime import shmfiles

SIZE = 256 << 20
PAGES = (0, 100, 65535)


@pytest.fixture
def shm_dir():
    d = Path(f"/dev/shm/snapbuild-test-sparse-{os.getpid()}")
    d.mkdir()
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def sparse_file(path: Path, zero_chunk: bool = False) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        if zero_chunk:  # as a tree written out from the store holds a chunk: data and zeros, 4 MiB
            os.pwrite(fd, bytes(4 << 20), 8 << 20)
        for p in PAGES:
            os.pwrite(fd, b"page%04d" % (p % 10000), p * 4096)
    finally:
        os.close(fd)


@pytest.mark.parametrize("zero_chunk", [False, True])
def test_put_back_writes_the_data_pages_only(shm_dir, tmp_path, zero_chunk):
    src = tmp_path / "src"
    src.mkdir()
    sparse_file(src / "psm_x", zero_chunk)
    [path] = shmfiles.put_back([{"name": "psm_x", "mode": 0o600, "size": SIZE}], src, shm_dir)
    st = path.stat()
    assert st.st_size == SIZE and st.st_blocks * 512 <= len(PAGES) * 4096, st.st_blocks
    with open(path, "rb") as f:
        for p in PAGES:
            f.seek(p * 4096)
            assert f.read(8) == b"page%04d" % (p % 10000)
        f.seek(8 << 20)
        assert f.read(4 << 20) == bytes(4 << 20)


def test_collect_carries_the_data_only(shm_dir, tmp_path):
    sparse_file(shm_dir / "psm_y")
    st = (shm_dir / "psm_y").stat()
    [rec] = shmfiles.collect({(st.st_dev, st.st_ino)}, tmp_path / "dest", shm_dir)
    copy = (tmp_path / "dest" / "psm_y").stat()
    assert rec["size"] == copy.st_size == SIZE
    assert copy.st_blocks * 512 <= 64 << 10, "the artifact's copy is sparse too (holes on the store's disk)"


def test_a_file_without_holes_is_copied_whole(tmp_path):
    (tmp_path / "a").write_bytes(os.urandom(3 << 20) + b"tail")
    fd_in, fd_out = os.open(tmp_path / "a", os.O_RDONLY), os.open(tmp_path / "b", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert shmfiles.copy_sparse(fd_in, fd_out) == (3 << 20) + 4
    finally:
        os.close(fd_in)
        os.close(fd_out)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
