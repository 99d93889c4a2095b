"""A blob store being filled by a pull, read while the pull goes on.

A node that restores a snapshot it does not have must fetch every blob, then write
the checkpoint's images and the server's inputs out of them. One after the other,
the node waits for the slowest blob before it writes the first byte. With
:class:`Arriving`, the writers start as soon as the snapshot's trees are in (they
arrive first, checked): a read of a chunk that is not there yet waits for the pull
to bring it, and the pull's threads (fetching, verifying, storing) and the writers'
(reading, decompressing, writing) overlap.

Nothing changes in what is verified or when it is visible: each blob is verified by
the pull before it is stored and again when it is read; a tree appears under its
name only when complete; the manifest goes into the store last. When the pull ends,
a read of a blob it did not bring fails as it would have before (not found), and
when the pull fails, waiting readers fail with its error.
"""

from __future__ import annotations

import threading

from ..errors import SnapbuildError
from .blobs import BlobStore

WAIT_SLICE_S = 1.0  # how often a waiting reader looks at the store itself again


class PullFailed(SnapbuildError):
    """The pull that was to bring a blob stopped before it arrived."""


class Arriving:
    """``blobs`` (a BlobStore) as a pull fills it; see the module docstring. Every
    other attribute is the store's own."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        self._cv = threading.Condition()
        self._done = False
        self._error: BaseException | None = None
        self.waits = 0  # reads that had to wait for their blob (a measure of the overlap)

    def __getattr__(self, name: str):
        return getattr(self._blobs, name)

    def arrived(self, digest: str) -> None:
        """Called by the pull once ``digest`` is stored."""
        with self._cv:
            self._cv.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        """The pull is over: ``error`` when it failed."""
        with self._cv:
            self._done, self._error = True, error
            self._cv.notify_all()

    def _wait(self, digest: str) -> None:
        if self._blobs.has(digest):
            return
        with self._cv:
            self.waits += 1
            while not self._blobs.has(digest) and not self._done:
                self._cv.wait(WAIT_SLICE_S)
            if not self._blobs.has(digest) and self._error is not None:
                raise PullFailed(f"blob {digest} did not arrive: the pull stopped ({self._error})")

    def get(self, digest: str) -> bytes:
        self._wait(digest)
        return self._blobs.get(digest)

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        self._wait(digest)
        return self._blobs.read_range(digest, offset, length)
