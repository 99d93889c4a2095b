"""Results taken from a remote build cache without --cache-trust: the mark the store
keeps for them (so that a later build records them too), and what `sign` makes of a
snapshot that records them. Caches are file:// registries; the signing is the real one."""

from __future__ import annotations

import pytest

from snapbuild.build import build
from snapbuild.registry import default_registry_url, open_registry, parse_ref
from snapbuild.registry.ref import Ref
from snapbuild.remote_cache import REPO, _mark, _marked
from snapbuild.signing import UntrustedSnapshot, keygen, sign_snapshot
from snapbuild.store import Store

RECIPE = """
name: chain
steps:
  a: {kind: command, run: "echo a > a.txt", outputs: [a.txt]}
  b: {kind: command, needs: [a], run: "cat $SNAPBUILD_INPUTS/a/a.txt > b.txt", outputs: [b.txt]}
publish: {tag: "chain:v1", steps: [b]}
"""


def _recorded(store: Store, result) -> dict:
    """step -> its unverified_cache record, as the published snapshot's config holds it."""
    import json

    reg = open_registry(default_registry_url(store.home))
    manifest = json.loads(reg.get_manifest("chain", result.snapshot))
    config = json.loads(reg.get_blob("chain", manifest["config"]["digest"]))
    return {s["name"]: s["unverified_cache"] for s in config["steps"] if "unverified_cache" in s}


def test_the_store_keeps_an_unverified_result_marked_until_it_is_built_here(recipe, tmp_path):
    path = recipe(RECIPE)
    cache = f"file://{tmp_path / 'cache'}"
    [first] = build(path, store=Store(tmp_path / "a"), cache_to=[cache])
    b = Store(tmp_path / "b")
    [taken] = build(path, store=b, cache_from=[cache])
    assert {r.status for r in taken.steps.values()} == {"cached"}
    entries = {n: open_registry(cache).resolve(Ref(name=REPO, tag=first.steps[n].key)) for n in ("a", "b")}
    assert _recorded(b, taken) == {n: {"registry": cache, "entry": e} for n, e in entries.items()}
    assert len(taken.warnings) == 2 and all("without --cache-trust" in w for w in taken.warnings)

    [again] = build(path, store=b)  # no --cache-from: b's result is in the store, still unverified
    assert again.steps["b"].status == "cached" and "b" in _recorded(b, again)
    assert any(w.startswith("step b came from the remote cache") for w in again.warnings)

    b.gc(older_than_s=0)  # what the warning's hint says: forget the results, build again
    [rebuilt] = build(path, store=b)
    assert {r.status for r in rebuilt.steps.values()} == {"built"}
    assert rebuilt.warnings == [] and _recorded(b, rebuilt) == {}
    assert rebuilt.snapshot == first.snapshot, "built here: the snapshot of a build that used no cache"


def test_signed_entries_clear_the_mark(recipe, tmp_path):
    path = recipe(RECIPE)
    cache = f"file://{tmp_path / 'cache'}"
    keygen(tmp_path / "ci.key")
    [first] = build(path, store=Store(tmp_path / "a"), cache_to=[cache], sign_key=tmp_path / "ci.key")
    b = Store(tmp_path / "b")
    build(path, store=b, cache_from=[cache])
    b.gc(older_than_s=0)
    [trusted] = build(path, store=b, cache_from=[cache], cache_trust=[tmp_path / "ci.key.pub"])
    assert trusted.warnings == [] and trusted.snapshot == first.snapshot
    [local] = build(path, store=b)  # the store's results are now the verified ones
    assert {r.status for r in local.steps.values()} == {"cached"}
    assert local.warnings == [] and local.snapshot == first.snapshot


def test_a_mark_names_one_result_of_a_key(store):
    _mark(store, "k" * 64, "sha256:" + "1" * 64, {"registry": "file:///c", "entry": "sha256:" + "2" * 64})
    assert _marked(store, "k" * 64, "sha256:" + "1" * 64) == {"registry": "file:///c", "entry": "sha256:" + "2" * 64}
    assert _marked(store, "k" * 64, "sha256:" + "3" * 64) is None, "another result for that key: not this mark"
    _mark(store, "k" * 64, "sha256:" + "1" * 64, None)
    assert _marked(store, "k" * 64, "sha256:" + "1" * 64) is None


def test_sign_refuses_a_snapshot_with_unverified_steps_unless_told(recipe, tmp_path):
    path = recipe(RECIPE)
    cache = f"file://{tmp_path / 'cache'}"
    build(path, store=Store(tmp_path / "a"), cache_to=[cache])
    b = Store(tmp_path / "b")
    build(path, store=b, cache_from=[cache])
    keygen(tmp_path / "ci.key")
    reg = open_registry(default_registry_url(b.home))
    with pytest.raises(UntrustedSnapshot, match=r"not signing chain:v1 .* a \(from file://") as refused:
        sign_snapshot(reg, parse_ref("chain:v1"), tmp_path / "ci.key")
    assert refused.value.exit_code == 10 and "--allow-untrusted-cache" in refused.value.hint
    out = sign_snapshot(reg, parse_ref("chain:v1"), tmp_path / "ci.key", allow_unverified_cache=True)
    assert [s["name"] for s in out["unverified_cache"]] == ["a", "b"] and out["signature"].startswith("sha256:")

    [clean] = build(path, store=Store(tmp_path / "c"))
    out = sign_snapshot(open_registry(default_registry_url(tmp_path / "c")), parse_ref("chain:v1"), tmp_path / "ci.key")
    assert out["unverified_cache"] == [] and out["digest"] == clean.snapshot
