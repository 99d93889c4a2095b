"""Pull a snapshot into the node's store and write its outputs out.

Imports only the store, registry and runtime packages: this runs on inference nodes.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from ..errors import SnapbuildError, UsageError
from ..registry import default_registry_url, open_registry, parse_ref
from ..store import Store
from ..registry.transfer import fetch
from ..runtime import erofs
from ..schema import read_config
from ..store.direct import Direct
from ..store.fsutil import atomic_write_json, read_json, remove_tree
from ..store.snapshot import check_snapshot, checks_id, load_config, pull_selection, referenced_blobs
from ..store.tree import load_tree, materialize


def pull(text: str, *, registry: str | None = None, dest: Path | None = None,
         store: Store | None = None, jobs: int = 16, trust_policy: Path | None = None,
         cache_max: int | None = None, images: bool = False, direct: bool = False) -> dict:
    """Fetch the blobs of snapshot ``text`` that the node lacks (verified), and, with
    ``dest``, write each output to ``dest/<step>/``. With ``trust_policy``, the snapshot
    must carry a signature the policy accepts, checked before anything else is fetched.
    ``cache_max`` (default ``$SNAPBUILD_NODE_CACHE_MAX``) bounds the store: the least
    recently used other snapshots are let go to fit (:mod:`.node_cache`).
    ``images``: where the snapshot ships tree images (runtime.erofs), fetch those
    instead of the chunks of the trees they replace (for a node that mounts them; not
    with ``dest``, which writes every output out). ``tree_images`` in the result says
    whether that happened.
    ``direct``: for a restore that writes the snapshot out at once, do not store the
    whole-file chunks of what it writes out once per node (the checkpoint's images, the
    input trees, the image's layers, the tree images: snapshot.direct_trees); ``blobs``
    in the result (a store.direct.Direct) fetches them from the registry as the writers
    read them. Not with ``dest``.
    Returns what happened, with timings."""
    from ..registry import locate

    text, registry = locate(text, registry)
    from .node_cache import evict, limit_from_env, stored_bytes

    store = store or Store()
    keep = f"pulled:{parse_ref(text).name}"
    let_go: list[str] = []
    while True:
        try:
            with store.using():  # keeps `cache gc` from running under a pull
                out = _pull(text, registry, dest, store, jobs, trust_policy, images and dest is None,
                            direct and dest is None)
            break
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            # The disk is full: the least recently used other snapshot makes room, and
            # the pull goes on (what it fetched is kept); with none left, say so.
            freed = evict(store, stored_bytes(store) - 1, keep=keep)
            if not freed["evicted"]:
                raise SnapbuildError(
                    f"the node's disk is full: cannot store {text} in {store.home} ({e.strerror})"
                    + (f", even after letting go of {', '.join(let_go)}" if let_go else ""),
                    hint="free space on that file system, or give the store a bigger one "
                         "($SNAPBUILD_HOME); `snapbuild-runner gc` frees what no snapshot uses") from None
            let_go += freed["evicted"]
    if let_go:
        out["disk_full_evicted"] = let_go
    limit = cache_max if cache_max is not None else limit_from_env()
    if limit is not None:
        out["cache"] = evict(store, limit, keep=keep)
    return out


def _pull(text: str, registry: str | None, dest: Path | None, store: Store, jobs: int,
          trust_policy: Path | None = None, images: bool = False, direct: bool = False) -> dict:
    t0 = time.monotonic()
    reg = open_registry(registry or default_registry_url(store.home))
    ref = parse_ref(text)
    digest = reg.resolve(ref)
    trust = None
    from ..signing import Policy, node_policy, verify

    trust_policy = node_policy(trust_policy)
    if trust_policy is not None:
        trust = verify(reg, ref, digest, Policy.load(trust_policy))
    refused = erofs.refused_for(trust) if images else None
    images = images and refused is None
    t_resolve = time.monotonic()
    # A snapshot this node already pulled whole, and checked under today's rules, is
    # neither fetched nor checked again (pins keep its blobs from gc; every read is
    # still verified against its digest).
    pin = f"pulled:{ref.name}"
    checked = checks_id()
    complete = (store.pinned_manifest(pin) == digest and store.blobs.has(digest)
                and store.pinned_checked(pin) == checked
                and (images or not store.pinned_with_images(pin)) and (direct or not store.pinned_direct(pin)))

    # What this pull leaves out (or the complete one before it did): only that is not in the store.
    with_direct = direct and (not complete or store.pinned_direct(pin))

    def select(manifest: dict):
        return pull_selection(store.blobs, manifest, load_config(store.blobs, manifest), images=images, direct=direct)

    got = fetch(reg, ref, store.blobs, jobs=jobs, digest=digest, skip_check=complete,
                select=select if images or direct else None,
                check=lambda manifest: check_snapshot(store.blobs, manifest, str(ref)))
    config = load_config(store.blobs, got["manifest"])
    snapshot = read_config(config, str(ref))  # typed, for this node (checked in full above, if fetched now)
    # Images were used by this pull, or by the complete one before it.
    with_images = images and snapshot.tree_images is not None and (not complete or store.pinned_with_images(pin))
    # The node keeps the last pull of each name until a newer one replaces it.
    store.pin_snapshot(pin, digest, images=with_images, direct=with_direct, checked=checked)
    t_fetch = time.monotonic()
    missing, fetched = got["blobs_fetched"], got["bytes_fetched"]

    outputs = {}
    if dest is not None:
        outputs = write_outputs(store, str(ref), digest, config["outputs"], Path(dest))
    t_done = time.monotonic()
    return {
        "ref": str(ref), "digest": digest, "name": config["name"], "config": config, "snapshot": snapshot,
        "blobs_fetched": missing, "bytes_fetched": fetched,
        "blobs_total": len(referenced_blobs(got["manifest"])) + 1, "outputs": outputs, "trust": trust,
        "tree_images": with_images, "tree_images_refused": refused,
        "blobs": Direct(store.blobs, lambda d: reg.get_blob(ref.name, d)) if with_direct else store.blobs,
        "timings": {"resolve_s": round(t_resolve - t0, 4), "fetch_s": round(t_fetch - t_resolve, 4),
                    "materialize_s": round(t_done - t_fetch, 4), "total_s": round(t_done - t0, 4)},
    }


#: In ``dest`` while ``pull --dest`` writes it: the snapshot and the outputs started, so
#: that the same pull run again after a kill knows what in ``dest`` is its own.
PULL_MARKER = ".snapbuild-pull.json"


def write_outputs(store: Store, ref: str, digest: str, trees: dict[str, str], dest: Path) -> dict[str, str]:
    """Write each output (step -> tree digest) of snapshot ``digest`` to ``dest/<step>``,
    all or none. ``dest`` must be new or empty, or hold what an interrupted pull into it
    left (:data:`PULL_MARKER` says what): its outputs of the same snapshot are complete
    (a tree appears under its name only whole) and kept; the rest of it, half-written
    trees and another snapshot's outputs, is removed. Anything else there is refused."""
    mine = _resume(dest, digest, trees)
    marker = dest / PULL_MARKER
    outputs: dict[str, str] = {}
    started = list(mine)
    try:
        for step, tree_digest in trees.items():
            if step not in mine:
                started.append(step)  # listed first: a kill after the rename still leaves it ours
                atomic_write_json(marker, {"digest": digest, "outputs": started})
                where = f"snapshot {ref}, step {step!r}: tree"
                materialize(store.blobs, load_tree(store.blobs, tree_digest, where), dest / step, where)
            outputs[step] = str(dest / step)
    except BaseException:
        for step in started:  # all outputs or none
            remove_tree(dest / step, ignore_errors=True)
        marker.unlink(missing_ok=True)
        raise
    marker.unlink(missing_ok=True)
    return outputs


def _resume(dest: Path, digest: str, trees: dict[str, str]) -> set[str]:
    """The outputs in ``dest`` that an interrupted pull of snapshot ``digest`` finished
    (reused), once what else it left there is removed; a UsageError when ``dest`` holds
    anything that is not that pull's."""
    try:
        names = sorted(os.listdir(dest))
    except FileNotFoundError:
        return set()
    except NotADirectoryError:
        raise UsageError(f"destination {dest} is not a folder", hint="choose a new or empty folder") from None
    if all(n.startswith(f".{PULL_MARKER}.") for n in names):  # killed while it wrote its first marker
        for name in names:
            (dest / name).unlink(missing_ok=True)
        return set()
    try:
        record = read_json(dest / PULL_MARKER)
        started = [s for s in record["outputs"] if isinstance(s, str) and "/" not in s and s not in ("", ".", "..")]
        same = record["digest"] == digest
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"destination {dest} is not empty", hint="choose a new or empty folder") from None
    ours = set(started) | {PULL_MARKER}
    foreign = [n for n in names if n not in ours and not _leftover(n)]
    if foreign:
        raise UsageError(f"destination {dest} is not empty: {foreign[0]!r} is not from the interrupted pull "
                         f"of {record['digest']}", hint="choose a new or empty folder")
    kept = {s for s in started if same and s in trees and os.path.isdir(dest / s) and not os.path.islink(dest / s)}
    for name in names:
        if name not in kept and name != PULL_MARKER:
            remove_tree(dest / name)
    return kept


def _leftover(name: str) -> bool:
    """A name an interrupted pull may leave: a tree being written (tree.materialize's
    ``.<step>.XXXX.partial``) or the marker's temporary file."""
    return (name.startswith(".") and name.endswith(".partial")) or name.startswith(f".{PULL_MARKER}.")
