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
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import NotFound, SnapbuildError
from .plan import Plan
from .registry import open_registry
from .registry.base import Registry
from .registry.ref import Ref
from .registry.transfer import fetch, push
from .store import Store
from .store.fsutil import canonical_json
from .store.local import StepRef
from .store.snapshot import MANIFEST_MEDIA_TYPE, chunk_layers, parse_manifest, referenced_blobs

REPO = "snapbuild-cache"
ARTIFACT_TYPE = "application/vnd.snapbuild.cache.v1"
CONFIG_MEDIA_TYPE = "application/vnd.snapbuild.cache.config.v1+json"


def _ref(key: str) -> Ref:
    return Ref(name=REPO, tag=key)


def _parse(data: bytes, digest: str) -> dict:
    return parse_manifest(data, digest, ARTIFACT_TYPE, CONFIG_MEDIA_TYPE)


@dataclass
class Hit:
    key: str
    entry: dict  # the config: key, name, kind, artifact, duration_s
    registry: Registry
    manifest_digest: str


def lookup(regs: list[Registry], key: str) -> Hit | None:
    """The first registry that holds a result for ``key``, with its entry."""
    for reg in regs:
        try:
            digest = reg.resolve(_ref(key))
        except NotFound:
            continue
        manifest = _parse(reg.get_manifest(REPO, digest), digest)
        entry = json.loads(reg.get_blob(REPO, manifest["config"]["digest"]))
        if entry.get("key") == key and entry.get("artifact"):
            return Hit(key=key, entry=entry, registry=reg, manifest_digest=digest)
    return None


def download(hit: Hit, store: Store, jobs: int = 8) -> dict:
    """Bring the hit's output into the store (verified) and record it as the step's result."""
    got = fetch(hit.registry, _ref(hit.key), store.blobs, jobs=jobs, digest=hit.manifest_digest, parse=_parse)
    e = hit.entry
    store.put_ref(StepRef(key=hit.key, artifact=e["artifact"], name=e.get("name", ""), kind=e.get("kind", ""),
                          duration_s=e.get("duration_s", 0.0)))
    return got


def upload(reg: Registry, store: Store, ref: StepRef, jobs: int = 8) -> dict | None:
    """Send a local step result to ``reg``, unless it holds one for that key already."""
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
    return push(reg, _ref(ref.key), digest, referenced_blobs(manifest), store.blobs, jobs=jobs)


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


def apply(plan: Plan, store: Store, urls: list[str], say=lambda msg: None) -> dict:
    """Turn the plan's steps that ``urls`` hold into cache hits (their reason says
    where), downloading what the build needs here. Returns {step: registry url}."""
    regs = [open_registry(u) for u in urls]
    hits: dict[str, Hit] = {}
    for name, ps in plan.steps.items():
        if ps.action != "run" or plan.recipe.steps[name].kind.ephemeral:
            continue
        try:
            hit = lookup(regs, ps.key)
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
    return {name: hit.registry.url for name, hit in hits.items()}
