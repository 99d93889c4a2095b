"""A node's store, bounded: least-recently-used snapshots make room for new ones.

Every snapshot pulled on a node shares the node's one store, so a chunk that two
snapshots have is fetched and kept once. With a bound (``--cache-max SIZE`` or
``SNAPBUILD_NODE_CACHE_MAX``), each pull ends by letting go of the snapshots used least
recently (their ``pulled:`` pins, touched by every pull and restore) until the blobs
fit; the snapshot just pulled is always kept. What a let-go snapshot shares with a kept
one stays. Servers already running are not affected: their files are written out
under the run root, which `snapbuild-runner gc` looks after.
"""

from __future__ import annotations

from ..store import Store
from .. import settings

parse_size = settings.parse_size  # the one size syntax of the node

def limit_from_env() -> int | None:
    """The node setting ``cache_max`` (``$SNAPBUILD_NODE_CACHE_MAX``), in bytes; None: unbounded."""
    return settings.get("cache_max")


def stored_bytes(store: Store) -> int:
    return sum(store.blobs.size(d) for d in store.blobs.digests())


def evict(store: Store, max_bytes: int, keep: str | None = None) -> dict:
    """Let go of the least recently used pulled snapshots (never ``keep``, a pin name
    such as ``pulled:torch-mlp``) until the store's blobs fit in ``max_bytes``."""
    size = stored_bytes(store)
    evicted, freed = [], 0
    if size > max_bytes:
        pins = sorted((p for p in store.pin_files() if p.parent.name == "pulled"), key=lambda p: p.stat().st_mtime)
        for pin in pins:
            name = "pulled:" + pin.stem
            if name == keep:
                continue
            pin.unlink(missing_ok=True)
            report = store.gc()
            evicted.append(pin.stem)
            freed += report.bytes_freed
            size -= report.bytes_freed
            if size <= max_bytes:
                break
    return {"max_bytes": max_bytes, "stored_bytes": size, "evicted": evicted, "bytes_freed": freed,
            "fits": size <= max_bytes}
