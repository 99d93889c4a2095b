"""A node's blob store backed by the registry its snapshot came from.

A restore on an empty node writes the checkpoint's images, the server's input trees
and layers, and the tree images out once per node and never reads their chunks again: storing each chunk first, then reading it
back to write the file, is a second full pass over the bytes (and a second sha256).
A pull with ``direct`` leaves those chunks out of the store (snapshot.pull_selection);
the restore reads through :class:`Direct`, which hands it the store's blob where
there is one and otherwise fetches it from the registry, verified against its digest
by the registry client, without storing it. The writers are the store's usual ones
(tree.materialize, erofs.write_image): a tree or image appears under its name only
complete, so a killed restore leaves nothing half-written, and the next one fetches
what it still lacks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .blobs import BlobStore


class Direct:
    """``blobs`` (a BlobStore), with ``fetch(digest) -> bytes`` (verified) for the
    blobs it lacks; every other attribute is the store's own."""

    def __init__(self, blobs: BlobStore, fetch: Callable[[str], bytes]) -> None:
        self._blobs = blobs
        self._fetch = fetch
        self._lock = threading.Lock()
        self.fetched = 0  # blobs that came from the registry, not the store
        self.fetched_bytes = 0

    def __getattr__(self, name: str):
        return getattr(self._blobs, name)

    def _remote(self, digest: str) -> bytes:
        data = self._fetch(digest)
        with self._lock:
            self.fetched += 1
            self.fetched_bytes += len(data)
        return data

    def is_local(self, digest: str) -> bool:
        """Whether the blob is in the store."""
        return self._blobs.has(digest)

    def get(self, digest: str) -> bytes:
        if self.is_local(digest):
            return self._blobs.get(digest)
        return self._remote(digest)

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        if self.is_local(digest):
            return self._blobs.read_range(digest, offset, length)
        # packs are stored by the pull; this is for a store that lost one meanwhile
        return self._remote(digest)[offset:offset + length]
