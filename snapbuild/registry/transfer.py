"""Moving whole snapshots between a store and a registry, or two registries.

Only the blobs the destination lacks are sent, several at a time, each checked
against its digest; the manifest (and with it the tag) goes last, so a reader never
sees a snapshot with a blob missing, and an interrupted push is completed by the
next one (the blobs already sent are skipped).

Fetched blobs stream into a temporary file in the store while hashed, each bounded
by its descriptor's size (:mod:`.bounds`); a manifest whose descriptors give a blob
more than its kind can hold (a chunk over CHUNK_SIZE, a tree over TREE_MAX) is
refused before anything is fetched.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import IntegrityError
from ..store.blobs import BlobStore
from ..store.chunks import MAX_BLOB_SIZE
from ..store.snapshot import metadata_blobs, parse_manifest, referenced_blobs
from ..store.tree import MEDIA_TYPE as TREE_MEDIA_TYPE
from .base import Registry
from .bounds import DOCUMENT_MAX, TREE_MAX, remember
from .ref import Ref


def push(reg: Registry, ref: Ref, manifest_digest: str, blobs: list[str], source: BlobStore, *,
         jobs: int = 8, progress=None) -> dict:
    """Send snapshot ``manifest_digest`` (with ``blobs``, all in ``source``) to ``reg``
    as ``ref``. ``progress(verb, blobs to move, bytes of this one)`` is called per blob
    moved (from worker threads). Returns counts and timings."""
    t0 = time.monotonic()
    blobs = list(dict.fromkeys(blobs))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        present = list(pool.map(lambda d: reg.has_blob(ref.name, d), blobs))
        missing = [d for d, there in zip(blobs, present, strict=True) if not there]

        def send(d: str) -> int:
            if not source.verify(d):
                raise IntegrityError(f"blob {d} in {source.root} is corrupt; not publishing it",
                                     hint="run `snapbuild cache verify --repair`, then build again")
            moved = reg.put_blob(ref.name, d, Path(source.path(d))) is not False
            if progress:
                progress("sent", len(missing), source.size(d))
            return source.size(d) if moved else -1  # -1: mounted from another repository

        sizes = list(pool.map(send, missing))
        sent = sum(n for n in sizes if n > 0)
    reg.put_manifest(ref.name, manifest_digest, source.get(manifest_digest), ref.tag)
    return {"ref": str(ref), "digest": manifest_digest, "registry": reg.url, "blobs": len(blobs),
            "blobs_sent": len(missing) - sizes.count(-1), "blobs_mounted": sizes.count(-1), "bytes_sent": sent,
            "seconds": round(time.monotonic() - t0, 3)}


def fetch(reg: Registry, ref: Ref, dest: BlobStore, *, jobs: int = 8, digest: str | None = None,
          skip_check: bool = False, parse=parse_manifest, progress=None, select=None, check=None) -> dict:
    """Bring snapshot ``ref`` (resolved to ``digest`` when given) from ``reg`` into the
    store of ``dest``: the blobs it lacks, verified. ``skip_check`` trusts that the
    store holds them all and that ``check`` passed when they came; ``parse`` checks the manifest (a snapshot's by default).
    ``check(manifest)``, called once the config and tree blobs are in (and before any
    other blob is fetched), raises for a snapshot that must not be used (see
    schema.check_snapshot). ``select(manifest)``, called then, may name the
    only blobs wanted (a set), or None for all (see snapshot.image_selection).
    Returns the manifest, its digest, counts and timings."""
    t0 = time.monotonic()
    digest = digest or reg.resolve(ref)
    manifest_bytes = reg.get_manifest(ref.name, digest) if not dest.has(digest) else dest.get(digest)
    manifest = parse(manifest_bytes, digest)
    sizes = descriptor_sizes(manifest, f"manifest {digest} of {ref.name} in {reg.url}")
    remember(reg, manifest)  # a read of these blobs by digest alone (store.direct) is bounded too
    t_resolve = time.monotonic()
    wanted = referenced_blobs(manifest)
    fetched = count = 0
    total = [0]  # blobs to fetch, for progress

    def get(d: str) -> int:
        with dest.receiving(d) as f:  # streamed to disk, verified against its digest on the way
            reg.get_blob(ref.name, d, size=sizes[d], into=f)
            n = f.tell()
        if progress:
            progress("fetched", total[0], n)
        return n

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        if (select is not None or check is not None) and not skip_check:
            first = [d for d in metadata_blobs(manifest) if not dest.has(d)]
            total[0] = len(first)
            fetched, count = sum(pool.map(get, first)), len(first)
        if check is not None and not skip_check:
            check(manifest)
        if select is not None and not skip_check:
            chosen = select(manifest)
            if chosen is not None:
                wanted = [d for d in wanted if d in chosen]
        missing = [] if skip_check else [d for d in wanted if not dest.has(d)]
        total[0] = count + len(missing)
        fetched += sum(pool.map(get, missing))
        count += len(missing)
    # Last: a manifest in the store means its blobs are there (those ``select`` chose).
    dest.put(manifest_bytes)
    return {"digest": digest, "manifest": manifest, "blobs_fetched": count, "bytes_fetched": fetched,
            "resolve_s": round(t_resolve - t0, 4), "fetch_s": round(time.monotonic() - t_resolve, 4)}


def descriptor_sizes(manifest: dict, where: str) -> dict[str, int]:
    """digest -> size of each blob ``manifest`` names; refused (before anything is
    fetched) where a size is not one, or is more than a blob of its kind can hold."""
    caps = {TREE_MEDIA_TYPE: TREE_MAX, **MAX_BLOB_SIZE}
    out = {}
    for i, desc in enumerate([manifest["config"], *manifest["layers"]]):
        size, cap = desc.get("size"), DOCUMENT_MAX if i == 0 else caps.get(desc.get("mediaType"))
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or (cap is not None and size > cap):
            what = "config" if i == 0 else f"layer {desc['digest']} ({desc.get('mediaType')})"
            raise IntegrityError(f"{where}: its {what} gives a size of {size!r}"
                                 + (f", more than such a blob can hold ({cap})" if cap is not None else "")
                                 + "; refused", hint="the registry holds a corrupt or hostile manifest; do not use it")
        out[desc["digest"]] = size
    return out


def copy(src: Registry, ref: Ref, dst: Registry, dst_ref: Ref, store: BlobStore, *, jobs: int = 8,
         progress=None, check=None) -> dict:
    """Snapshot ``ref`` of ``src`` to ``dst`` as ``dst_ref``, through the local store
    (what it already holds is not fetched; everything is verified on the way in, and
    by ``check``, as :func:`fetch` says)."""
    got = fetch(src, ref, store, jobs=jobs, progress=progress, check=check)
    out = push(dst, dst_ref, got["digest"], referenced_blobs(got["manifest"]), store, jobs=jobs, progress=progress)
    return {**out, "source": f"{src.url} {ref}", "blobs_fetched": got["blobs_fetched"],
            "bytes_fetched": got["bytes_fetched"]}
