"""Files as lists of chunks: fixed-size pieces, zstd-compressed when that pays, with
all-zero pieces not stored at all.

A chunk reference is a small dict kept in the tree blob::

    {"enc": "zstd", "digest": "sha256:...", "size": 4194304}   # compressed blob
    {"enc": "raw",  "digest": "sha256:...", "size": 4194304}   # incompressible, stored as is
    {"enc": "zero", "size": 4194304}                           # a hole: nothing stored

``size`` is always the uncompressed length; ``digest`` names the stored bytes, so the
blob store verifies them without decompressing, and a blob maps one-to-one onto an OCI
blob. Fixed-size chunks keep dedup simple and effective for the data snapbuild stores
(CRIU page images, weight files, layers): the same bytes at the same offsets give the
same chunks, and a snapshot that changes one file re-stores only that file's chunks.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from ..errors import IntegrityError
from .blobs import BlobStore

CHUNK_SIZE = 4 << 20
ZSTD_LEVEL = 1  # fast: CI time matters more than the last few percent
# Keep the compressed form only when it saves at least this fraction.
MIN_SAVING = 0.05

MEDIA_TYPES = {
    "zstd": "application/vnd.snapbuild.chunk.v1.zstd",
    "raw": "application/vnd.snapbuild.chunk.v1",
}

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _is_zero(data: bytes) -> bool:
    # Comparing against a prebuilt zero buffer runs at memcmp speed.
    return data == bytes(len(data)) if data[:1] == b"\0" and data[-1:] == b"\0" else False


def put_chunk(blobs: BlobStore, data: bytes) -> dict:
    size = len(data)
    if _is_zero(data):
        return {"enc": "zero", "size": size}
    packed = _compressor().compress(data)
    if len(packed) <= size * (1 - MIN_SAVING):
        return {"enc": "zstd", "digest": blobs.put(packed), "size": size}
    return {"enc": "raw", "digest": blobs.put(data), "size": size}


def put_stream(blobs: BlobStore, f: BinaryIO, chunk_size: int = CHUNK_SIZE) -> tuple[list[dict], str]:
    """Store a file's chunks; returns them and the sha256 of the whole content."""
    chunks = []
    h = hashlib.sha256()
    while data := f.read(chunk_size):
        h.update(data)
        chunks.append(put_chunk(blobs, data))
    return chunks, "sha256:" + h.hexdigest()


def get_chunk(blobs: BlobStore, ref: dict) -> bytes:
    """The uncompressed bytes of one chunk, verified by digest and length."""
    enc, size = ref["enc"], ref["size"]
    if enc == "zero":
        return bytes(size)
    data = blobs.get(ref["digest"])
    if enc == "zstd":
        data = _decompressor().decompress(data, max_output_size=size)
    elif enc != "raw":
        raise IntegrityError(f"chunk {ref.get('digest')} has an unknown encoding {enc!r}")
    if len(data) != size:
        raise IntegrityError(f"chunk {ref['digest']} holds {len(data)} bytes, expected {size}")
    return data


def write_chunks(blobs: BlobStore, chunks: list[dict], dest: Path, mode: int = 0o644) -> None:
    """Rebuild a file from its chunks; zero chunks become holes (sparse files)."""
    with open(dest, "wb") as f:
        for ref in chunks:
            if ref["enc"] == "zero":
                f.seek(ref["size"], os.SEEK_CUR)
            else:
                f.write(get_chunk(blobs, ref))
        f.truncate()
    os.chmod(dest, mode)


def chunk_digests(chunks: list[dict]) -> Iterator[str]:
    for ref in chunks:
        if "digest" in ref:
            yield ref["digest"]


class ChunkReader(io.RawIOBase):
    """A file's content read from its chunks, one verified chunk at a time."""

    def __init__(self, blobs: BlobStore, chunks: list[dict]) -> None:
        self._blobs, self._chunks, self._i, self._buf = blobs, list(chunks), 0, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            if self._i >= len(self._chunks):
                return 0
            self._buf = memoryview(get_chunk(self._blobs, self._chunks[self._i]))
            self._i += 1
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
