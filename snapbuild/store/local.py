"""The local store under ``$SNAPBUILD_HOME`` (default ``~/.cache/snapbuild``)::

    $SNAPBUILD_HOME/
      blobs/sha256/<hex>        content-addressed chunks, trees, configs, manifests
      refs/steps/<key>.json     step key -> {"artifact": tree digest, ...}
      refs/snapshots/build/<build>.json   the last snapshot of each build, kept by gc
      refs/snapshots/pulled/<name>.json   the last pull of each name (on nodes)
      state/<build>/<step>.json what each step was last built from (for `plan`'s "why")
      logs/<key>.log            the log of the build that produced a step key
      locks/                    flock files: store.lock (shared by builds, exclusive for gc)
                                and steps/<key>.lock (one builder per key)
      tmp/                      temporary files; only ever renamed into place
      work/                     scratch folders of running steps
      cache/trees/<hex>/        artifacts written out once, hard-linked into command steps
      registry/                 the default file:// registry

Ordering makes crashes harmless: chunks are written before the tree that lists them,
the tree before the ref that names it, so a ref only ever points at complete data.
A killed build leaves, at worst, unreferenced blobs and temp files; ``gc`` removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator

from ..errors import IntegrityError, NotFound
from .blobs import BlobStore
from .fsutil import atomic_write, atomic_write_json, flock, read_json, remove_tree
from .tree import load_tree, tree_blobs, tree_size


def default_home() -> Path:
    from .. import settings

    named = settings.get("home")
    if named:
        return Path(named).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "snapbuild"


@dataclass
class StepRef:
    key: str
    artifact: str
    name: str
    kind: str
    duration_s: float = 0.0


@dataclass
class VerifyReport:
    blobs_checked: int = 0
    refs_checked: int = 0
    corrupt_blobs: list[str] = field(default_factory=list)
    broken_refs: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.corrupt_blobs and not self.broken_refs


@dataclass
class GcReport:
    blobs_removed: int = 0
    bytes_freed: int = 0
    refs_removed: int = 0
    logs_removed: int = 0
    temp_removed: int = 0


class Store:
    """The local content-addressed store. Safe for several processes at once."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home else default_home()
        self.blobs = BlobStore(self.home, self.home / "tmp")

    # -- paths -------------------------------------------------------------------------
    def _ref_path(self, key: str) -> Path:
        return self.home / "refs" / "steps" / f"{key}.json"

    def log_path(self, key: str) -> Path:
        return self.home / "logs" / f"{key}.log"

    def _state_path(self, build: str, step: str) -> Path:
        return self.home / "state" / _safe(build) / f"{_safe(step)}.json"

    # -- locks -------------------------------------------------------------------------
    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Held (shared) for the whole of a build, so ``gc`` never runs under it."""
        with flock(self.home / "locks" / "store.lock", shared=True):
            yield

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[None]:
        """One builder per step key: a second build of the same key waits, then hits."""
        with flock(self.home / "locks" / "steps" / f"{key}.lock"):
            yield

    # -- step refs ---------------------------------------------------------------------
    def get_ref(self, key: str) -> StepRef | None:
        """The artifact recorded for a step key, or None when not built (or incomplete)."""
        try:
            data = read_json(self._ref_path(key))
        except (FileNotFoundError, ValueError):
            return None
        ref = StepRef(key=key, artifact=data["artifact"], name=data.get("name", ""),
                      kind=data.get("kind", ""), duration_s=data.get("duration_s", 0.0))
        if not self.blobs.has(ref.artifact):
            return None
        return ref

    def is_complete(self, ref: StepRef) -> bool:
        """Whether the ref's tree and every chunk it names are present."""
        try:
            tree = load_tree(self.blobs, ref.artifact)
        except (NotFound, IntegrityError):
            return False
        return all(self.blobs.has(d) for d in tree_blobs(tree))

    def put_ref(self, ref: StepRef) -> None:
        atomic_write_json(self._ref_path(ref.key), {
            "artifact": ref.artifact, "name": ref.name, "kind": ref.kind,
            "duration_s": round(ref.duration_s, 3)}, tmp_dir=self.home / "tmp")

    def touch_ref(self, key: str) -> None:
        """Mark a ref as used now (``gc --older-than`` keeps recently used ones)."""
        with contextlib.suppress(OSError):
            os.utime(self._ref_path(key))

    def refs(self) -> Iterator[tuple[str, dict, float]]:
        base = self.home / "refs" / "steps"
        if not base.is_dir():
            return
        for p in sorted(base.glob("*.json")):
            try:
                yield p.stem, read_json(p), p.stat().st_mtime
            except (OSError, ValueError):
                yield p.stem, {}, 0.0

    # -- state (what each step was last built from) -------------------------------------
    def get_state(self, build: str, step: str) -> dict | None:
        try:
            return read_json(self._state_path(build, step))
        except (FileNotFoundError, ValueError):
            return None

    def put_state(self, build: str, step: str, state: dict) -> None:
        path = self._state_path(build, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, state, tmp_dir=self.home / "tmp")

    # -- logs --------------------------------------------------------------------------
    def put_log(self, key: str, src: Path) -> None:
        """Keep a step's log under its key (atomically, so a reader never sees half)."""
        path = self.log_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, src.read_bytes(), tmp_dir=self.home / "tmp")

    # -- scratch -----------------------------------------------------------------------
    def scratch(self, prefix: str) -> Path:
        import tempfile

        base = self.home / "work"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{_safe(prefix)}-", dir=base))

    # -- maintenance -------------------------------------------------------------------
    def referenced(self, skip: frozenset[str] = frozenset()) -> tuple[set[str], list[tuple[str, str]]]:
        """Blobs reachable from step refs (but those in ``skip``), and refs whose data is
        missing or corrupt."""
        live: set[str] = set()
        broken: list[tuple[str, str]] = []
        for key, data, _ in self.refs():
            if key in skip:
                continue
            art = data.get("artifact")
            if not art:
                broken.append((key, "ref file is unreadable"))
                continue
            try:
                tree = load_tree(self.blobs, art)
            except NotFound:
                broken.append((key, f"artifact {art} is missing"))
                continue
            except (IntegrityError, ValueError):
                broken.append((key, f"artifact {art} is corrupt"))
                continue
            live.add(art)
            for d in tree_blobs(tree):
                live.add(d)
                if not self.blobs.has(d):
                    broken.append((key, f"chunk {d} is missing"))
        return live, broken

    def verify(self, *, repair: bool = False) -> VerifyReport:
        """Hash every blob and check every ref; with ``repair``, drop what is bad so
        that the next build recreates it."""
        report = VerifyReport()
        for digest in self.blobs.digests():
            report.blobs_checked += 1
            if not self.blobs.verify(digest):
                report.corrupt_blobs.append(digest)
        if repair:
            for digest in report.corrupt_blobs:
                self.blobs.remove(digest)
        _, report.broken_refs = self.referenced()
        report.refs_checked = sum(1 for _ in self.refs())
        broken_pins = self._broken_pins()
        report.broken_refs += [(f"pin:{p.parent.name}/{p.stem}", why) for p, why in broken_pins]
        if repair:
            for key, _why in report.broken_refs:
                if not key.startswith("pin:"):
                    self._ref_path(key).unlink(missing_ok=True)
            for p, _why in broken_pins:
                p.unlink(missing_ok=True)
            report.repaired = True
        return report

    def _broken_pins(self) -> list[tuple[Path, str]]:
        """Pinned snapshots whose manifest or blobs are missing or corrupt."""
        import json

        out = []
        for p in self.pin_files():
            try:
                pin = read_json(p)
                digest = pin["manifest"]
                manifest = json.loads(self.blobs.get(digest))
                wanted = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
                if pin.get("images") or pin.get("direct"):  # a pull that did not store every blob
                    from .snapshot import load_config, pull_selection

                    chosen = pull_selection(self.blobs, manifest, load_config(self.blobs, manifest),
                                            images=bool(pin.get("images")), direct=bool(pin.get("direct")))
                    wanted = [d for d in wanted if chosen is None or d in chosen]
            except (OSError, ValueError, KeyError, NotFound, IntegrityError) as e:
                out.append((p, f"snapshot manifest unreadable: {e}"))
                continue
            missing = [d for d in wanted if not self.blobs.has(d)]
            if missing:
                out.append((p, f"snapshot {digest[:19]} lacks {len(missing)} blobs, e.g. {missing[0]}"))
        return out

    def gc(self, *, older_than_s: float | None = None, dry_run: bool = False) -> GcReport:
        """Remove unreferenced blobs and stale temp files; with ``older_than_s``, first
        forget step refs not used for that long. Waits for running builds to finish."""
        report = GcReport()
        with flock(self.home / "locks" / "store.lock"):
            forgotten: set[str] = set()
            stale_pins: set[Path] = set()
            if older_than_s is not None:
                cutoff = time.time() - older_than_s
                forgotten = {key for key, _, mtime in self.refs() if mtime < cutoff}
                stale_pins = {p for p in self.pin_files() if p.stat().st_mtime < cutoff}
                report.refs_removed = len(forgotten)
                if not dry_run:
                    for key in forgotten:
                        self._ref_path(key).unlink(missing_ok=True)
                    for p in stale_pins:
                        p.unlink(missing_ok=True)
            live, _ = self.referenced(skip=frozenset(forgotten))
            live |= self._pinned(skip=stale_pins)
            for digest in list(self.blobs.digests()):
                if digest not in live:
                    report.blobs_removed += 1
                    report.bytes_freed += self.blobs.size(digest)
                    if not dry_run:
                        self.blobs.remove(digest)
            keep_logs = ({key for key, _, _ in self.refs()} - forgotten) | self._state_keys()
            logs = self.home / "logs"
            if logs.is_dir():
                for p in logs.glob("*.log"):
                    if p.stem not in keep_logs:
                        report.logs_removed += 1
                        if not dry_run:
                            p.unlink(missing_ok=True)
            # Written-out trees (command steps' inputs) whose artifact is gone.
            trees = self.home / "cache" / "trees"
            if trees.is_dir():
                for p in trees.iterdir():
                    if f"sha256:{p.name.removesuffix('.partial')}" not in live or p.name.endswith(".partial"):
                        report.temp_removed += 1
                        if not dry_run:
                            remove_tree(p, ignore_errors=True)
            # Nothing else runs under the exclusive lock, so every temp file and step
            # lock file is stale.
            for sub in ("tmp", "work", "locks/steps"):
                d = self.home / sub
                if d.is_dir():
                    for p in d.iterdir():
                        report.temp_removed += 1
                        if not dry_run:
                            remove_tree(p)
        return report

    def _state_keys(self) -> set[str]:
        """Keys whose logs `snapbuild logs` may still show (last attempts, last builds)."""
        keys = set()
        for p in (self.home / "state").glob("*/*.json"):
            with contextlib.suppress(OSError, ValueError):
                data = read_json(p)
                keys.update(k for k in (data.get("key"), data.get("last_key")) if k)
        return keys

    def pin_files(self) -> list[Path]:
        d = self.home / "refs" / "snapshots"
        return sorted(d.glob("*/*.json")) if d.is_dir() else []

    def _pinned(self, skip: set[Path] = frozenset()) -> set[str]:
        """Blobs kept alive by snapshot pins (the last snapshot of each build or pull):
        each pinned manifest and every blob it lists."""
        import json

        pins = set()
        for p in self.pin_files():
            if p in skip:
                continue
            with contextlib.suppress(OSError, ValueError, KeyError, NotFound, IntegrityError):
                digest = read_json(p)["manifest"]
                manifest = json.loads(self.blobs.get(digest))
                pins.add(digest)
                pins.add(manifest["config"]["digest"])
                pins.update(layer["digest"] for layer in manifest["layers"])
        return pins

    def pinned_manifest(self, name: str) -> str | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return read_json(self._pin_path(name))["manifest"]
        return None

    def _pin_path(self, name: str) -> Path:
        # Builds and pulls pin in separate folders: no recipe name can collide with a pull.
        space, sep, rest = name.partition(":")
        if sep and space == "pulled":
            return self.home / "refs" / "snapshots" / "pulled" / f"{_safe(rest)}.json"
        return self.home / "refs" / "snapshots" / "build" / f"{_safe(name)}.json"

    def pin_snapshot(self, name: str, manifest_digest: str, *, images: bool = False, direct: bool = False,
                     checked: str | None = None) -> None:
        """Keep ``name``'s latest snapshot (its manifest, and so its blobs) from gc; an
        older snapshot of the same name is let go. Written only when it changes.
        ``images``: only the blobs a node that mounts tree images needs were fetched;
        ``direct``: the chunks of the trees written straight from the registry were not
        stored (see snapshot.pull_selection); ``checked``: the rules the snapshot passed
        when it came (snapshot.checks_id), so that it is not checked again under them."""
        path = self._pin_path(name)
        pin = {"name": name, "manifest": manifest_digest, **({"images": True} if images else {}),
               **({"direct": True} if direct else {}), **({"checked": checked} if checked else {})}
        with contextlib.suppress(OSError, ValueError):
            if read_json(path) == pin:
                os.utime(path)  # still in use: `gc --older-than` keeps it
                return
        atomic_write_json(path, pin, tmp_dir=self.home / "tmp")

    def pinned_checked(self, name: str) -> str | None:
        """The rules the pinned pull of ``name`` passed (see :meth:`pin_snapshot`)."""
        with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
            return read_json(self._pin_path(name)).get("checked")
        return None

    def pinned_with_images(self, name: str) -> bool:
        """Whether the pinned pull of ``name`` fetched only what tree images need."""
        return self._pin_flag(name, "images")

    def pinned_direct(self, name: str) -> bool:
        """Whether the pinned pull of ``name`` left out the chunks it wrote straight out."""
        return self._pin_flag(name, "direct")

    def _pin_flag(self, name: str, key: str) -> bool:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return bool(read_json(self._pin_path(name)).get(key))
        return False

    def du(self) -> dict:
        n = total = 0
        for digest in self.blobs.digests():
            n += 1
            total += self.blobs.size(digest)
        logical = 0
        for _, data, _ in self.refs():
            with contextlib.suppress(Exception):
                logical += tree_size(load_tree(self.blobs, data["artifact"]))
        return {"home": str(self.home), "blobs": n, "stored_bytes": total,
                "steps": sum(1 for _ in self.refs()), "artifact_bytes": logical}


def _safe(name: str) -> str:
    """A name made safe for one path component, distinct for distinct names."""
    out = "".join(c if c.isalnum() or c in "-_.=," else "_" for c in name).strip(".")
    if out != name:  # `org/model` and `org_model` must not share a folder
        out = f"{out or '_'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return out
