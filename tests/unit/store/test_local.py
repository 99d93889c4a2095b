"""The local store: verify, repair, gc and the safety of concurrent use."""

from __future__ import annotations

import os
import time

from snapbuild.build import build
from snapbuild.store.fsutil import flock

RECIPE = """
name: demo
steps:
  a: {kind: command, run: "head -c 200000 /dev/urandom > a.bin", outputs: [a.bin]}
  b: {kind: command, needs: [a], run: "cp $SNAPBUILD_INPUTS/a/a.bin b.bin", outputs: [b.bin]}
"""


def test_verify_detects_and_repair_recovers(recipe, store):
    path = recipe(RECIPE)
    [res] = build(path, store=store)
    assert store.verify().ok
    victim = next(d for d in store.blobs.digests() if store.blobs.size(d) > 100_000)
    p = store.blobs.path(victim)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))

    report = store.verify()
    assert report.corrupt_blobs == [victim] and not report.ok
    report = store.verify(repair=True)
    assert report.repaired and not store.blobs.has(victim)
    steps = {k for k, _ in report.broken_refs if not k.startswith("pin:")}
    assert steps <= {r.key for r in res.steps.values()}
    assert "pin:build/demo" in {k for k, _ in report.broken_refs}, "the snapshot using it is dropped too"
    assert report.broken_refs, "entries using the corrupt blob must be dropped"

    [again] = build(path, store=store)
    assert again.ok and any(r.status == "built" for r in again.steps.values())
    assert store.verify().ok


def test_gc_keeps_live_data_and_removes_garbage(recipe, store):
    [res] = build(recipe(RECIPE), store=store)
    garbage = store.blobs.put(b"nobody refers to me")
    (store.home / "tmp").mkdir(exist_ok=True)
    (store.home / "tmp" / "blob-leftover").write_bytes(b"half a blob")
    report = store.gc()
    assert report.blobs_removed == 1 and report.temp_removed >= 1
    assert not store.blobs.has(garbage)
    assert store.verify().ok
    assert store.blobs.has(res.snapshot), "a built snapshot's manifest stays"
    assert all(store.get_ref(r.key) for r in res.steps.values())


def test_gc_older_than_forgets_unused_entries(recipe, store):
    [res] = build(recipe(RECIPE), store=store)
    old = time.time() - 10 * 86400
    for r in res.steps.values():
        os.utime(store.home / "refs" / "steps" / f"{r.key}.json", (old, old))
    dry = store.gc(older_than_s=86400, dry_run=True)
    assert dry.refs_removed == 2 and all(store.get_ref(r.key) for r in res.steps.values())
    report = store.gc(older_than_s=86400)
    assert report.refs_removed == 2
    assert not any(store.get_ref(r.key) for r in res.steps.values())


def test_gc_waits_for_running_builds(store):
    with store.using():
        with flock(store.home / "locks" / "store.lock", blocking=False) as got:
            assert not got, "gc's exclusive lock must not be granted while a build holds the store"
    with flock(store.home / "locks" / "store.lock", blocking=False) as got:
        assert got


def test_du_counts(recipe, store):
    build(recipe(RECIPE), store=store)
    info = store.du()
    assert info["steps"] == 2 and info["artifact_bytes"] == 400_000
    assert info["stored_bytes"] >= 200_000  # random data is stored raw, b copies a: dedup
    assert info["stored_bytes"] < 300_000


def test_gc_keeps_logs_that_logs_can_still_show(recipe, store):
    path = recipe(RECIPE.replace('run: "cp', 'run: "exit 1; cp'))
    [res] = build(path, store=store)
    assert res.steps["b"].status == "failed"
    orphan = store.log_path("0" * 64)
    orphan.write_text("from a forgotten build")
    report = store.gc()
    assert report.logs_removed == 1 and not orphan.exists()
    assert store.log_path(res.steps["b"].key).exists(), "the failed attempt's log stays"
    assert store.log_path(res.steps["a"].key).exists()


def test_gc_dry_run_predicts_the_real_run(recipe, store):
    [res] = build(recipe(RECIPE), store=store)
    old = time.time() - 10 * 86400
    for p in [*(store.home / "refs" / "steps").iterdir(), *(store.home / "refs" / "snapshots").iterdir()]:
        os.utime(p, (old, old))
    dry = store.gc(older_than_s=86400, dry_run=True)
    real = store.gc(older_than_s=86400)
    assert dry.blobs_removed == real.blobs_removed > 0
    assert dry.bytes_freed == real.bytes_freed and dry.logs_removed == real.logs_removed


def test_only_the_latest_snapshot_of_a_build_is_pinned(recipe, store):
    path = recipe(RECIPE.replace("name: demo", "name: demo\nvars: {n: 1}").replace(
        'run: "cp', 'run: "echo {{ n }} > n; cp').replace("outputs: [b.bin]", "outputs: [b.bin, n]"))
    [first] = build(path, store=store)
    [second] = build(path, store=store, sets={"n": 2})
    assert first.snapshot != second.snapshot
    store.gc()
    assert store.blobs.has(second.snapshot) and not store.blobs.has(first.snapshot)


def test_published_files_are_readable_by_others(recipe, store):
    [res] = build(recipe(RECIPE), store=store, tag="demo:v")
    index = store.home / "registry" / "demo" / "index.json"
    for p in (store.blobs.path(res.snapshot), index):
        assert p.stat().st_mode & 0o044 == 0o044, f"{p} should be group/other readable"


def test_state_names_do_not_collide(store):
    store.put_state("m[model=org/x]", "s", {"v": 1})
    store.put_state("m[model=org_x]", "s", {"v": 2})
    assert store.get_state("m[model=org/x]", "s") == {"v": 1}


def test_verify_reports_and_repairs_a_broken_snapshot_pin(recipe, store):
    [res] = build(recipe(RECIPE), store=store)
    store.blobs.remove(res.snapshot)
    report = store.verify()
    assert any(k.startswith("pin:build/") for k, _ in report.broken_refs) and not report.ok
    store.verify(repair=True)
    assert store.verify().ok


def test_build_and_pull_pins_never_collide(store):
    m1, m2 = store.blobs.put(b"manifest one"), store.blobs.put(b"manifest two")
    store.pin_snapshot("pulled:pipeline", m1)
    store.pin_snapshot("pulled_pipeline", m2)
    assert store.pinned_manifest("pulled:pipeline") == m1 and store.pinned_manifest("pulled_pipeline") == m2


def test_gc_drops_written_out_trees_of_forgotten_artifacts(recipe, store):
    [res] = build(recipe(RECIPE), store=store)  # b reads a: a's tree is written out
    trees = store.home / "cache" / "trees"
    assert [p.name for p in trees.iterdir()] == [res.steps["a"].artifact.split(":")[1]]
    store.gc()
    assert any(trees.iterdir()), "still in use"
    for p in (store.home / "refs" / "steps").iterdir():
        os.utime(p, (1, 1))
    for p in (store.home / "refs" / "snapshots").rglob("*.json"):
        os.utime(p, (1, 1))
    store.gc(older_than_s=60)
    assert not any(trees.iterdir())
