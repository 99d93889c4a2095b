"""Content-addressed blobs: ``blobs/sha256/<hex>``, the same layout as an OCI image
layout's blob directory, so a store's blobs can be published by hard link or copy.

A blob's name is the sha256 of its stored bytes. Blobs are immutable, written
atomically, and verified against their name on every read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO
from collections.abc import Iterator

from ..errors import IntegrityError, NotFound
from .fsutil import publish_file, temp_file

ALGO = "sha256"


def digest_bytes(data: bytes) -> str:
    return f"{ALGO}:{hashlib.sha256(data).hexdigest()}"


def split_digest(digest: str) -> tuple[str, str]:
    algo, sep, hexpart = digest.partition(":")
    if not sep or algo != ALGO or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return algo, hexpart


class BlobStore:
    """A directory of content-addressed blobs."""

    def __init__(self, root: Path, tmp_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.tmp_dir = tmp_dir or self.root / "tmp"
        # Plain strings: a snapshot has thousands of blobs and pathlib costs ~50 us each.
        self._base = os.path.join(self.root, "blobs", ALGO) + os.sep

    def _file(self, digest: str) -> str:
        if len(digest) != 71 or not digest.startswith("sha256:"):
            split_digest(digest)  # raises with a clear message
        return self._base + digest[7:]

    def path(self, digest: str) -> Path:
        split_digest(digest)
        return Path(self._file(digest))

    def has(self, digest: str) -> bool:
        return os.path.isfile(self._file(digest))

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its digest; a no-op when it is already stored."""
        digest = digest_bytes(data)
        final = self.path(digest)
        if final.exists():
            return digest
        with temp_file(self.tmp_dir, prefix="blob-") as (fd, tmp):
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            publish_file(tmp, final, replace=False)
        return digest

    @contextlib.contextmanager
    def receiving(self, digest: str) -> Iterator[BinaryIO]:
        """A temporary file in the store for blob ``digest``, for a writer that checks
        the digest as it writes (a registry client streams a blob into it while hashing
        it): when the block ends without an error, it is fsynced and becomes the blob
        (an existing one is kept); otherwise it goes. Never the whole blob in memory."""
        final = self.path(digest)
        with temp_file(self.tmp_dir, prefix="blob-") as (fd, tmp):
            with os.fdopen(fd, "w+b", closefd=False) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            publish_file(tmp, final, replace=False)

    def put_file(self, src: Path, digest: str) -> None:
        """Copy an existing blob file from another store, verifying it on the way."""
        if self.has(digest):
            return
        h = hashlib.sha256()
        with open(src, "rb") as f, self.receiving(digest) as out:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            if f"{ALGO}:{h.hexdigest()}" != digest:
                raise IntegrityError(f"blob {digest} at {src} does not match its digest")

    def get(self, digest: str) -> bytes:
        """Read a blob and check it against its digest."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in {self.root}") from None
        if digest_bytes(data) != digest:
            raise IntegrityError(
                f"blob {digest} is corrupt: its content does not hash to its name ({path})",
                hint="run `snapbuild cache verify --repair` to drop it; the next build recreates it",
            )
        return data

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a blob from ``offset``, not verified (the caller checks
        what it reads: see chunks.get_chunk)."""
        try:
            fd = os.open(self._file(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in {self.root}") from None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise IntegrityError(f"blob {digest} is shorter than a slice it should hold "
                                 f"({offset}+{length})",
                                 hint="run `snapbuild cache verify --repair` to drop it")
        return data

    def remove(self, digest: str) -> None:
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            pass

    def digests(self) -> Iterator[str]:
        base = self.root / "blobs" / ALGO
        if not base.is_dir():
            return
        for entry in os.scandir(base):
            if entry.is_file() and len(entry.name) == 64:
                yield f"{ALGO}:{entry.name}"

    def verify(self, digest: str) -> bool:
        h = hashlib.sha256()
        with open(self.path(digest), "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return f"{ALGO}:{h.hexdigest()}" == digest
