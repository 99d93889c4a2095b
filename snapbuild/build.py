"""The library's entry points for ``plan`` and ``build`` (the CLI is a thin layer on these)."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from .exec import BUILT, CACHED, BuildResult, execute
from .exec.report import NullReporter, Reporter
from .plan import Plan, make_plan
from .recipe import Recipe, load_recipe
from .errors import UsageError
from .registry import default_registry_url, open_registry, snapshot_ref
from . import remote_cache
from .registry.transfer import push
from .store import Store
from .store.snapshot import assemble


def plan(recipe_path: str | Path, *, sets: dict | None = None, store: Store | None = None,
         offline: bool = False) -> list[Plan]:
    store = store or Store()
    return [_make_plan(recipe_path, r, store, offline) for r in load_recipe(recipe_path, sets)]


def offline_env() -> bool:
    """``HF_HUB_OFFLINE=1`` (huggingface_hub's switch) makes a build offline, as ``--offline`` does."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _make_plan(recipe_path: str | Path, recipe: Recipe, store: Store, offline: bool) -> Plan:
    from . import lock

    if not (offline or offline_env()):
        return make_plan(recipe, store)
    return make_plan(recipe, store, offline=True, locked=lock.read(recipe_path)["builds"].get(recipe.build_id),
                     lock_file=lock.lock_path(recipe_path).name)


def build(recipe_path: str | Path, *, sets: dict | None = None, store: Store | None = None,
          jobs: int = 1, keep_going: bool = False, tag: str | None = None,
          registry: str | None = None, reporter: Reporter | None = None,
          locked: bool = False, push: tuple[str, ...] | list[str] = (),
          cache_from: tuple[str, ...] | list[str] = (), cache_to: tuple[str, ...] | list[str] = (),
          sign_key: Path | None = None, cache_trust: tuple[Path, ...] | list[Path] = (),
          offline: bool = False) -> list[BuildResult]:
    """Build every matrix combination of a recipe; publish each that succeeds and has a tag.

    Returns one :class:`BuildResult` per combination; a failed one has ``ok == False`` and
    ``snapshot is None``. Recipe errors raise before anything runs. Floating references
    are recorded in the lock file after a successful build; with ``locked`` the build
    refuses to start when they resolve differently from it. Each registry URL in
    ``push`` gets the published snapshot too, after the local registry. Step results
    are looked up in the ``cache_from`` registries before running (see
    :mod:`.remote_cache`), taking only entries signed by a ``cache_trust`` key when
    any is given, and sent to the ``cache_to`` ones after (signed with ``sign_key``).
    ``offline`` (or ``HF_HUB_OFFLINE=1``) plans from the lock file's pins and builds from
    the store and local caches (the Hugging Face cache, the Docker engine's images),
    reaching neither the Hub, S3 nor an image registry; registries named by the options
    above are still used.
    """
    from . import lock

    store = store or Store()
    reporter = reporter or NullReporter()
    recipes = load_recipe(recipe_path, sets)
    # Bad publishing options fail now, not after every step has run.
    if tag:
        snapshot_ref(tag, recipes[0].name)
    for url in ([registry] if registry else []) + list(push) + list(cache_from) + list(cache_to):
        open_registry(url)
    trust = remote_cache.Trust(sign_key=Path(sign_key) if sign_key else None,
                               keys=tuple(Path(k) for k in cache_trust))
    trust.policy()  # an unreadable key fails now
    if sign_key is not None:
        from .signing import load_private_key

        load_private_key(Path(sign_key))
        if not cache_to:
            raise UsageError("--sign-key signs what --cache-to sends, but no --cache-to is given")
    if cache_trust and not cache_from:
        raise UsageError("--cache-trust checks what --cache-from finds, but no --cache-from is given")
    if push and not (tag or all(r.tag for r in recipes)):
        raise UsageError("--push sends the published snapshot, but this build publishes none",
                         hint="give it a tag: --tag NAME:TAG, or `publish: {tag: ...}` in the recipe")
    if tag and len(recipes) > 1:
        raise UsageError(f"--tag names one snapshot but the recipe's matrix makes {len(recipes)}",
                         hint="set `publish: {tag: ...}` with a matrix variable in the recipe instead")
    results = []
    resolved: dict[str, dict] = {}
    try:
        with store.using():
            for recipe in recipes:
                t0 = time.monotonic()
                p = _make_plan(recipe_path, recipe, store, offline)
                resolved[recipe.build_id] = lock.entries(p)
                if locked:
                    lock.check(recipe_path, recipe.build_id, resolved[recipe.build_id])
                hits = (remote_cache.apply(p, store, list(cache_from), say=reporter.note, trust=trust)
                        if cache_from else {})
                reporter.plan(p)
                warnings = secret_warnings(recipe)
                for w in warnings:
                    reporter.note(f"warning: {w}")
                result = execute(p, store, jobs=jobs, keep_going=keep_going, reporter=reporter)
                result.warnings += warnings
                unverified = remote_cache.unverified_steps(p, result, store, hits)
                for name, record in unverified.items():
                    result.warnings.append(remote_cache.warning(name, record))
                    reporter.note(f"warning: {result.warnings[-1]}")
                for url in cache_to:
                    _share(result, store, url, reporter, trust.sign_key, skip=set(unverified))
                if result.ok:
                    _publish(recipe, result, store, tag or recipe.tag, registry, push, say=reporter.note,
                             unverified=unverified)
                # The whole build (planning and publishing too), not just running steps.
                result.duration_s = time.monotonic() - t0
                results.append(result)
                if not result.ok and not keep_going:
                    break
        if not locked and results and all(r.ok for r in results):
            lock.write(recipe_path, resolved)
    finally:
        reporter.close()
    return results


def secret_warnings(recipe: Recipe) -> list[str]:
    """One line per warm-up whose ``env`` or command has what looks like secrets (by
    name or by value): the checkpoint is the server's memory, so what it read from them
    ships in the snapshot."""
    out = []
    for name, step in recipe.steps.items():
        names = getattr(step.spec, "secret_env", lambda: [])()
        if names:
            out.append(f"step {name}: env or command {', '.join(names)} look like secrets; the checkpoint holds the "
                       "server's memory, so what it read from them ships in the snapshot "
                       "(docs/recipes.md, \"Secrets\")")
    return out


def _share(result: BuildResult, store: Store, url: str, reporter: Reporter, sign_key: Path | None = None,
           skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Send the step results this store holds to the remote cache at ``url``. With
    ``sign_key``, the ``skip`` steps (unverified ones) are not sent: signing them would
    vouch for what nobody checked."""
    reg = open_registry(url)
    sent = 0
    for r in result.steps.values():
        if r.status not in (BUILT, CACHED) or not r.artifact:
            continue
        ref = store.get_ref(r.key)
        if ref is None or not store.is_complete(ref):
            continue  # a remote hit this build did not need to download
        if sign_key is not None and r.name in skip:
            reporter.note(f"remote cache: {r.name} not sent to {reg.url}: it is unverified, and would be signed")
            continue
        if remote_cache.upload(reg, store, ref, sign_key=sign_key) is not None:
            sent += 1
    reporter.note(f"remote cache: {sent} step result(s) sent to {reg.url}")


def _publish(recipe: Recipe, result: BuildResult, store: Store, tag: str | None, registry: str | None,
             push_to: tuple[str, ...] | list[str] = (), say=lambda text: None,
             unverified: dict[str, dict] | None = None) -> None:
    """Assemble the snapshot and push it. ``unverified`` (step -> where it came from) is
    its provenance: steps nothing vouches for (see remote_cache), which `sign` refuses."""
    unverified = unverified or {}
    steps = [{"name": r.name, "kind": r.kind, "key": r.key, "artifact": r.artifact}
             | ({"unverified_cache": unverified[r.name]} if r.name in unverified else {})
             for r in result.steps.values()]
    outputs = {n: result.steps[n].artifact for n in recipe.publish_steps}
    runtime = None
    for n in recipe.publish_steps:
        extras = getattr(recipe.steps[n].kind, "snapshot_extras", None)
        if extras is not None:
            if runtime is not None:
                raise UsageError(f"a snapshot holds one checkpoint; publish.steps names several ({n}, ...)")
            runtime, trees = extras(store, outputs[n])
            runtime = replace(runtime, step=n, artifact=outputs[n])
            outputs.update(trees)  # the server's inputs travel with it
    from .image.tree_images import for_snapshot

    digest, blobs = assemble(store.blobs, name=recipe.name, variant=recipe.variant, steps=steps,
                             outputs=outputs, runtime=runtime, tree_images=for_snapshot(store, runtime, say))
    store.pin_snapshot(recipe.build_id, digest)
    result.snapshot = digest
    if tag:
        ref = snapshot_ref(tag, recipe.name)
        reg = open_registry(registry or default_registry_url(store.home))
        push(reg, ref, digest, blobs, store.blobs)
        result.tag = str(ref)
        result.registry = reg.url
        for url in push_to:
            result.pushed.append(push(open_registry(url), ref, digest, blobs, store.blobs))
