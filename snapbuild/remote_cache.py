"""A build cache shared through a registry: ``build --cache-from URL --cache-to URL``.

Each step result is stored as a small OCI artifact in repository ``snapbuild-cache``,
tagged with the step's key::

    manifest  artifactType application/vnd.snapbuild.cache.v1
      config  {"key", "name", "kind", "artifact", "duration_s"}
      layers  the artifact's tree, then every chunk it names (so registry gc keeps them)

A key is everything a step's output depends on, so a hit is as good as building. A
fresh machine asks the registries for every step it would run; a step found there is
cached without running, and its output is downloaded (verified) only when something
needs it here: a step that still runs and reads it, or the published snapshot.

Anyone who can push to the cache can put any output under any key. ``--cache-to URL
--sign-key KEY`` signs each entry it sends (a signature of the entry's manifest, as
``snapbuild sign`` makes for snapshots); ``--cache-from URL --cache-trust PUB`` takes
only entries signed by one of the given keys, so a job that can write the cache (a
pull request's CI) cannot poison a release build. Every entry is checked like a
snapshot before use: its config, its tree, and that the manifest lists every chunk.

An entry taken without ``--cache-trust`` is vouched for by nobody: the build names it
in a warning and the snapshot's config records it, on the step (its provenance)::

    steps: [{"name": "heavy", ..., "unverified_cache": {"registry": URL, "entry": DIGEST}},
            {"name": "final", ..., "unverified_cache": {"built_from": ["heavy"]}}]

and ``snapbuild sign`` refuses such a snapshot. The mark is kept in the store beside
the step's result (``refs/unverified/KEY.json``), so that a later build that finds the
result in the local store, or builds on it, records it too: the local store does not
launder an entry. Building the step here, or taking a signed entry for it, clears it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError, NotFound, SnapbuildError
from .exec import BUILT, CACHED, BuildResult
from .plan import Plan
from .registry import open_registry
from .registry.base import Registry
from .registry.ref import Ref
from .registry.transfer import fetch, push
from .store import Store
from .store.fsutil import atomic_write_json, canonical_json, read_json
from .store.local import StepRef
from .store.snapshot import (MANIFEST_MEDIA_TYPE, TREE_MEDIA_TYPE, chunk_layers, parse_manifest, referenced_blobs,
                             tree_layers_problem)

REPO = "snapbuild-cache"
ARTIFACT_TYPE = "application/vnd.snapbuild.cache.v1"
CONFIG_MEDIA_TYPE = "application/vnd.snapbuild.cache.config.v1+json"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _ref(key: str) -> Ref:
    return Ref(name=REPO, tag=key)


def _parse(data: bytes, digest: str) -> dict:
    return parse_manifest(data, digest, ARTIFACT_TYPE, CONFIG_MEDIA_TYPE)


@dataclass
class Trust:
    """How a build treats remote cache entries: sign what it sends with ``sign_key``;
    take only entries signed by one of ``keys`` (public key files) when given."""

    sign_key: Path | None = None
    keys: tuple[Path, ...] = ()

    def policy(self):
        from .signing import Policy, load_public_key

        if not self.keys:
            return None
        return Policy(rules=[("*", [load_public_key(k) for k in self.keys])], default="reject",
                      path=Path(", ".join(str(k) for k in self.keys)))


def _entry_problem(entry: object, key: str) -> str | None:
    if not isinstance(entry, dict) or entry.get("key") != key:
        return "its config is not an entry for this key"
    if not _DIGEST.match(str(entry.get("artifact", ""))):
        return "its artifact is not a digest"
    if not all(isinstance(entry.get(k, ""), str) for k in ("name", "kind")):
        return "its name or kind is not a string"
    if not isinstance(entry.get("duration_s", 0), (int, float)):
        return "its duration is not a number"
    return None


@dataclass
class Hit:
    key: str
    entry: dict  # the config: key, name, kind, artifact, duration_s
    registry: Registry
    manifest_digest: str
    verified: bool = False  # signed by a --cache-trust key

    def provenance(self) -> dict:
        """What a snapshot records of an unverified entry: where it came from."""
        return {"registry": self.registry.url, "entry": self.manifest_digest}


def lookup(regs: list[Registry], key: str, trust: Trust | None = None, say=lambda msg: None) -> Hit | None:
    """The first registry that holds a usable result for ``key``, with its entry. With
    ``trust.keys``, an entry no trusted key signed is passed over (and said why)."""
    policy = trust.policy() if trust else None
    for reg in regs:
        try:
            digest = reg.resolve(_ref(key))
        except NotFound:
            continue
        if policy is not None:
            from .signing import UntrustedSnapshot, verify

            try:
                verify(reg, _ref(key), digest, policy)
            except UntrustedSnapshot as e:
                say(f"remote cache {reg.url}: not using the entry for {key[:12]}: {e.message}")
                continue
        manifest = _parse(reg.get_manifest(REPO, digest), digest)
        try:
            entry = json.loads(reg.get_blob(REPO, manifest["config"]["digest"]))
        except ValueError:
            entry = None
        why = _entry_problem(entry, key)
        if why:
            say(f"remote cache {reg.url}: not using the entry for {key[:12]}: {why}")
            continue
        return Hit(key=key, entry=entry, registry=reg, manifest_digest=digest, verified=policy is not None)
    return None


def _check(store: Store, hit: Hit):
    def check(manifest: dict) -> None:
        trees = {x["digest"] for x in manifest["layers"] if x["mediaType"] == TREE_MEDIA_TYPE}
        why = tree_layers_problem(store.blobs, manifest) or (
            None if hit.entry["artifact"] in trees else "its artifact is not a tree of its manifest")
        if why:
            raise IntegrityError(f"remote cache {hit.registry.url}, entry {hit.key[:12]} "
                                 f"({hit.entry.get('name') or 'step'}): {why}; refusing it",
                                 hint="the cache holds a corrupt or hostile entry: remove it from the cache "
                                      "registry, and require signed entries (--cache-trust)")
    return check


def download(hit: Hit, store: Store, jobs: int = 8) -> dict:
    """Bring the hit's output into the store (verified) and record it as the step's result."""
    got = fetch(hit.registry, _ref(hit.key), store.blobs, jobs=jobs, digest=hit.manifest_digest, parse=_parse,
                check=_check(store, hit))
    e = hit.entry
    store.put_ref(StepRef(key=hit.key, artifact=e["artifact"], name=e.get("name", ""), kind=e.get("kind", ""),
                          duration_s=e.get("duration_s", 0.0)))
    _mark(store, hit.key, e["artifact"], None if hit.verified else hit.provenance())
    return got


def _mark_path(store: Store, key: str) -> Path:
    return store.home / "refs" / "unverified" / f"{key}.json"


def _mark(store: Store, key: str, artifact: str, record: dict | None) -> None:
    """Remember (or, with None, forget) that the store's result for ``key`` is unverified."""
    if record is None:
        _mark_path(store, key).unlink(missing_ok=True)
    else:
        atomic_write_json(_mark_path(store, key), {"artifact": artifact, **record}, tmp_dir=store.home / "tmp")


def _marked(store: Store, key: str, artifact: str | None) -> dict | None:
    """The unverified mark of the store's result ``artifact`` for ``key``, if it has one."""
    try:
        mark = read_json(_mark_path(store, key))
    except (OSError, ValueError):
        return None
    if not isinstance(mark, dict) or mark.pop("artifact", None) != artifact:
        return None  # a mark of another result for that key (since rebuilt here)
    return mark


def unverified_steps(plan: Plan, result: BuildResult, store: Store, hits: dict[str, Hit]) -> dict[str, dict]:
    """The steps of ``result`` that nothing vouches for, with where each came from: taken
    from a remote cache without --cache-trust (in this build: ``hits``; or earlier, into
    the store), or built here from such a step's output. Marks the results this build
    made here accordingly, so that later builds record them too."""
    out: dict[str, dict] = {}
    for name, r in result.steps.items():
        hit = hits.get(name)
        record = None
        if r.status == CACHED and hit is not None:
            record = None if hit.verified else hit.provenance()
        elif r.status == CACHED:
            record = _marked(store, r.key, r.artifact)
        elif r.status == BUILT:
            bad = sorted(d for d in _inputs(plan.recipe, name) if d in out)
            record = {"built_from": bad} if bad else None
            if r.artifact and not plan.recipe.steps[name].kind.ephemeral:
                _mark(store, r.key, r.artifact, record)
        if record:
            out[name] = record
    return out


def warning(name: str, record: dict) -> str:
    """The warning a build gives for an unverified step."""
    if "built_from" in record:
        src = f"was built from {', '.join(record['built_from'])}, which came from a remote cache unverified"
    else:
        src = (f"came from the remote cache {record.get('registry')} without --cache-trust (entry "
               f"{str(record.get('entry'))[:19]}): anyone who can write that cache could have put it there")
    return (f"step {name} {src}; the snapshot records it and `snapbuild sign` refuses it (forget the store's "
            "results: `snapbuild cache gc --older-than 0s`, then build with --cache-from URL --cache-trust PUBKEY)")


def upload(reg: Registry, store: Store, ref: StepRef, jobs: int = 8, sign_key: Path | None = None) -> dict | None:
    """Send a local step result to ``reg``, unless it holds one for that key already;
    with ``sign_key``, sign the entry sent."""
    try:
        reg.resolve(_ref(ref.key))
        return None
    except NotFound:
        pass
    entry = {"key": ref.key, "name": ref.name, "kind": ref.kind, "artifact": ref.artifact,
             "duration_s": round(ref.duration_s, 3)}
    config = canonical_json(entry)
    config_digest = store.blobs.put(config)
    manifest = {
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config)},
        "layers": chunk_layers(store.blobs, {ref.name or "output": ref.artifact}),
    }
    digest = store.blobs.put(canonical_json(manifest))
    out = push(reg, _ref(ref.key), digest, referenced_blobs(manifest), store.blobs, jobs=jobs)
    if sign_key is not None:
        from .signing import sign

        out["signature"] = sign(reg, _ref(ref.key), sign_key, digest=digest)["signature"]
    return out


def needed_steps(plan: Plan) -> set[str]:
    """Steps whose output this build must hold: the published ones (with, for a
    checkpoint, everything its warm-up used: they travel in the snapshot), and the
    inputs of every step that runs (through warm-ups, which run inside checkpoints)."""
    recipe = plan.recipe
    need: set[str] = set(recipe.publish_steps)
    for name in recipe.publish_steps:
        need |= _inputs(recipe, name)
    for name, ps in plan.steps.items():
        if ps.action == "run":
            need |= _inputs(recipe, name)
    return need


def _inputs(recipe, name: str) -> set[str]:
    out: set[str] = set()
    for d in recipe.steps[name].deps:
        out.add(d)
        if recipe.steps[d].kind.ephemeral:  # a warm-up: its inputs are the checkpoint's
            out |= _inputs(recipe, d)
    return out


def apply(plan: Plan, store: Store, urls: list[str], say=lambda msg: None,
          trust: Trust | None = None) -> dict[str, Hit]:
    """Turn the plan's steps that ``urls`` hold into cache hits (their reason says
    where), downloading what the build needs here. Returns {step: hit}."""
    regs = [open_registry(u) for u in urls]
    hits: dict[str, Hit] = {}
    for name, ps in plan.steps.items():
        if ps.action != "run" or plan.recipe.steps[name].kind.ephemeral:
            continue
        try:
            hit = lookup(regs, ps.key, trust, say=lambda msg, name=name: say(f"{name}: {msg}"))
        except SnapbuildError as e:  # an unreadable cache is a miss, not a failed build
            say(f"remote cache: {name}: {e.message}; building it")
            continue
        if hit is not None:
            hits[name] = hit
            ps.action, ps.artifact, ps.reason = "cached", hit.entry["artifact"], f"in remote cache {hit.registry.url}"
    # Warm-ups are cached when their checkpoint is: nothing starts them then.
    for name, ps in plan.steps.items():
        kind = plan.recipe.steps[name].kind
        if ps.action == "run" and kind.ephemeral:
            consumers = [n for n, s in plan.recipe.steps.items() if name in s.deps]
            if consumers and all(plan.steps[c].action == "cached" for c in consumers):
                ps.action, ps.reason = "cached", ""
    need = needed_steps(plan)
    for name, hit in hits.items():
        if name in need:
            got = download(hit, store)
            say(f"remote cache: {name} from {hit.registry.url} ({got['blobs_fetched']} blobs fetched)")
        else:
            say(f"remote cache: {name} found in {hit.registry.url}; not needed here, not downloaded")
    return hits
