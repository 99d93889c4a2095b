"""weights steps against real parts: S3 (moto's standalone server on 127.0.0.1), the
real huggingface_hub client, and local folders.

The Hugging Face Hub cannot be reached from these machines: the hf:// tests run the
real huggingface_hub client against tests/integration/fakehub.py, a small local
server that stands in for the Hub and speaks the part of its API the client calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapbuild.build import build, plan
from snapbuild.store.chunks import ChunkReader
from snapbuild.store.tree import load_tree

from fakehub import FakeHub  # tests/integration/fakehub.py

pytestmark = pytest.mark.integration


def files_of(store, artifact: str) -> dict[str, bytes]:
    tree = load_tree(store.blobs, artifact)
    return {e["path"]: ChunkReader(store.blobs, e).read() for e in tree["entries"] if e["type"] == "file"}


@pytest.fixture
def s3(s3_server, aws_env):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server)


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield h
    h.close()


def test_s3_objects_are_pinned_fetched_and_refetched_when_they_change(s3, s3_server, recipe, store, run_cli):
    bucket = f"models-{os.getpid()}-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="mlp/v1/weights.bin", Body=b"w" * 100_000)
    s3.put_object(Bucket=bucket, Key="mlp/v1/config.json", Body=b'{"width": 8}')
    s3.put_object(Bucket=bucket, Key="mlp/v1/notes.md", Body=b"not selected")
    path = recipe(f"""
        name: s3w
        steps:
          w: {{kind: weights, source: "s3://{bucket}/mlp/v1/", endpoint_url: "{s3_server}",
               include: ["*.bin", "*.json"]}}
    """)
    [res] = build(path, store=store)
    assert res.ok, res.steps["w"].error
    assert files_of(store, res.steps["w"].artifact) == {"weights.bin": b"w" * 100_000, "config.json": b'{"width": 8}'}
    [again] = plan(path, store=store)
    assert again.steps["w"].action == "cached"
    s3.put_object(Bucket=bucket, Key="mlp/v1/config.json", Body=b'{"width": 16}')
    [changed] = plan(path, store=store)
    assert (changed.steps["w"].action, changed.steps["w"].reason) == ("run", "files changed: config.json")
    log = (Path(store.home) / "logs").glob("*.log")
    assert not any("testing-secret" in p.read_text() for p in log), "credentials never reach logs"

    missing = recipe(f"""
        name: s3w
        steps:
          w: {{kind: weights, source: "s3://no-such-bucket-{os.getpid()}/x/", endpoint_url: "{s3_server}"}}
    """, name="missing.yaml")
    r = run_cli("plan", missing)
    assert r.code == 3 and "the bucket does not exist" in r.err, r


def test_versioned_s3_objects_are_pinned_by_version(s3, s3_server, recipe, store):
    bucket = f"versioned-{os.getpid()}-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    v1 = s3.put_object(Bucket=bucket, Key="m/a.bin", Body=b"one")["VersionId"]
    path = recipe(f"""
        name: s3v
        steps:
          w: {{kind: weights, source: "s3://{bucket}/m/", endpoint_url: "{s3_server}"}}
    """)
    [p] = plan(path, store=store)
    assert p.steps["w"].material["pins"]["files"]["a.bin"]["version"] == v1
    [res] = build(path, store=store)
    assert files_of(store, res.steps["w"].artifact) == {"a.bin": b"one"}


def test_hub_revisions_are_pinned_to_commits_and_files_fetched(hub, recipe, store, run_cli, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_1234")
    first = hub.publish("acme/tiny", {"model.safetensors": b"\x01" * 5000, "config.json": b"{}",
                                      "README.md": b"hello"})
    path = recipe("""
        name: hfw
        steps:
          w: {kind: weights, source: "hf://acme/tiny@main", include: ["*.safetensors", "*.json"]}
    """)
    [p] = plan(path, store=store)
    assert p.steps["w"].material["pins"]["commit"] == first
    [res] = build(path, store=store)
    assert res.ok, (res.steps["w"].error, res.steps["w"].log_tail)
    assert files_of(store, res.steps["w"].artifact) == {"model.safetensors": b"\x01" * 5000, "config.json": b"{}"}
    assert "Authorization: (given)" in hub.requests, "the token from HF_TOKEN was used"
    leaked = [p for p in store.home.rglob("*") if p.is_file() and b"hf_not_a_real_token" in p.read_bytes()]
    assert leaked == [], "the token never reaches keys, logs or snapshots"

    second = hub.publish("acme/tiny", {"model.safetensors": b"\x02" * 5000, "config.json": b"{}"})
    [p2] = plan(path, store=store)
    assert p2.steps["w"].material["pins"]["commit"] == second and p2.steps["w"].action == "run"

    for source, message in (("hf://acme/tiny@no-such-branch", "revision 'no-such-branch' does not exist"),
                            ("hf://acme/nothing", "no model repository 'acme/nothing'")):
        bad = recipe(f"name: hfw\nsteps:\n  w: {{kind: weights, source: \"{source}\"}}\n", name="bad.yaml")
        r = run_cli("plan", bad)
        assert r.code == 3 and message in r.err, r
    nothing = recipe('name: hfw\nsteps:\n  w: {kind: weights, source: "hf://acme/tiny", include: ["*.gguf"]}\n',
                     name="nothing.yaml")
    r = run_cli("plan", nothing)
    assert r.code == 3 and "no file of hf://acme/tiny matches include ['*.gguf']" in r.err, r


def test_local_folders_by_content_shared_files_stored_once(recipe, project, store, run_cli):
    for d in ("a", "b"):
        (project / d).mkdir()
    blob = os.urandom(6 << 20)  # random: it does not compress, two 4 MiB chunks
    (project / "a" / "shared.bin").write_bytes(blob)
    (project / "b" / "shared.bin").write_bytes(blob)
    (project / "b" / "extra.txt").write_text("only in b")
    path = recipe("""
        name: local
        steps:
          a: {kind: weights, source: "file://a"}
    """)
    [res] = build(path, store=store)
    before = {p.name for p in (store.home / "blobs").rglob("*") if p.is_file()}
    path_b = recipe("""
        name: local
        steps:
          b: {kind: weights, source: "file://b"}
    """, name="b.yaml")
    [res_b] = build(path_b, store=store)
    assert files_of(store, res_b.steps["b"].artifact)["shared.bin"] == blob
    entry = next(e for e in load_tree(store.blobs, res_b.steps["b"].artifact)["entries"] if e["path"] == "shared.bin")
    chunks = {c["digest"].split(":")[1] for c in entry["chunks"]}
    assert len(chunks) == 2 and chunks <= before, "the shared file's chunks were stored once, by step a"

    (project / "b" / "escape").symlink_to("/etc/passwd")
    r = run_cli("plan", path_b)
    assert r.code == 3 and "escape is a link to /etc/passwd, outside the folder" in r.err, r


def test_the_lock_file_records_resolutions_and_locked_builds_refuse_drift(hub, recipe, store, run_cli):
    first = hub.publish("acme/locked", {"w.bin": b"1" * 1000})
    path = recipe("""
        name: lk
        steps:
          w: {kind: weights, source: "hf://acme/locked@main"}
    """)
    r = run_cli("build", path, "--locked")
    assert r.code == 3 and "lk: not in recipe.lock" in r.err, r
    assert run_cli("build", path).code == 0
    lock = json.loads((path.parent / "recipe.lock").read_text())
    assert lock["builds"]["lk"]["w"]["resolved"]["commit"] == first
    assert run_cli("build", path, "--locked").code == 0
    assert run_cli("lock", path).code == 0

    second = hub.publish("acme/locked", {"w.bin": b"2" * 1000})  # the branch moves
    r = run_cli("build", path, "--locked")
    assert r.code == 3, r
    assert f"w: hf://acme/locked@main resolves to commit {second[:12]}, locked {first[:12]}" in r.err
    r = run_cli("lock", path)
    assert r.code == 3 and "resolves to commit" in r.out, r  # like build --locked
    r = run_cli("lock", path, "--update")
    assert r.code == 0 and "updated" in r.out
    assert json.loads((path.parent / "recipe.lock").read_text())["builds"]["lk"]["w"]["resolved"]["commit"] == second
    assert run_cli("build", path, "--locked").code == 0


def test_a_download_cut_half_way_is_tried_again_and_checked(hub, recipe, store):
    data = os.urandom(3 << 20)
    hub.publish("acme/cut", {"model.safetensors": data})
    hub.cut.add("model.safetensors")
    path = recipe('name: cut\nsteps:\n  w: {kind: weights, source: "hf://acme/cut"}\n')
    [res] = build(path, store=store)
    assert res.ok, (res.steps["w"].error, res.steps["w"].log_tail)
    assert files_of(store, res.steps["w"].artifact) == {"model.safetensors": data}
    gets = [r for r in hub.requests if r.startswith("GET") and r.endswith("/model.safetensors")]
    assert len(gets) == 2, f"the client tried again after the cut (resuming, or from the start): {hub.requests}"


def test_a_build_killed_mid_download_leaves_no_half_file(hub, recipe, store, run_cli):
    import signal

    data = os.urandom(3 << 20)
    hub.publish("acme/big", {"model.safetensors": data, "config.json": b"{}"})
    hub.stall.add("model.safetensors")
    path = recipe('name: big\nsteps:\n  w: {kind: weights, source: "hf://acme/big"}\n')
    proc = subprocess.Popen([str(Path(sys.executable).parent / "snapbuild"), "build", str(path), "--progress", "none"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert hub.stalled.wait(60), "the download should have started"
        os.killpg(proc.pid, signal.SIGKILL)  # a crash half way through the file
        proc.wait(timeout=30)
    finally:
        hub.release.set()
    hub.stall.clear()
    [p] = plan(path, store=store)
    assert p.steps["w"].action == "run", "nothing of the killed download counts as built"
    half = data[: len(data) // 2]
    assert not any(f.is_file() and f.read_bytes() == half for f in (store.home / "blobs").rglob("*")), \
        "no half file is a blob"
    v = run_cli("cache", "verify", "--json")
    assert v.code == 0 and json.loads(v.out)["ok"], v

    [res] = build(path, store=store)  # the next run starts the download over and completes
    assert res.ok, (res.steps["w"].error, res.steps["w"].log_tail)
    assert files_of(store, res.steps["w"].artifact) == {"model.safetensors": data, "config.json": b"{}"}
    assert run_cli("cache", "gc").code == 0
    assert not any((store.home / "work").iterdir()), "gc clears what the killed build left in its work folder"


def test_offline_builds_plan_from_the_lock_file_and_reach_no_source(hub, s3, s3_server, recipe, store, run_cli,
                                                                     tmp_path):
    commit = hub.publish("acme/off", {"model.safetensors": b"\x05" * 4000, "config.json": b"{}"})
    bucket = f"off-{os.getpid()}-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="m/w.bin", Body=b"s" * 1000)
    path = recipe(f"""
        name: offl
        steps:
          w: {{kind: weights, source: "hf://acme/off@main"}}
          s: {{kind: weights, source: "s3://{bucket}/m/", endpoint_url: "{s3_server}"}}
    """)
    r = run_cli("plan", path, "--offline")
    assert r.code == 3 and "step 's': s3://" in r.err and "has no pin in recipe.lock" in r.err, r
    assert "Traceback" not in r.err
    assert run_cli("build", path).code == 0  # online: writes recipe.lock

    asked = len(hub.requests)
    dead = {"HF_ENDPOINT": "http://127.0.0.1:9", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    r = run_cli("build", path, "--offline", "--json", env=dead)
    assert r.code == 0, r
    assert {s["name"]: s["status"] for s in json.loads(r.out)["steps"]} == {"w": "cached", "s": "cached"}
    r = run_cli("plan", path, "--json", env={**dead, "HF_HUB_OFFLINE": "1"})
    assert r.code == 0 and all(s["action"] == "cached" for s in json.loads(r.out)["steps"]), r
    assert len(hub.requests) == asked, "an offline plan asks the Hub nothing"

    # A fresh store: the Hub's files come from the Hugging Face cache, by the locked
    # commit; S3's have no cache outside the store, and the error says so.
    fresh = {**dead, "SNAPBUILD_HOME": str(tmp_path / "fresh"), "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    r = run_cli("build", path, "--offline", "-k", env=fresh)
    assert r.code == 4, r
    assert "is neither in the store nor in the Hugging Face cache" in r.err and f"commit {commit[:12]}" in r.err, r
    assert "offline, and this step's result is not in the store" in r.err, r
    from huggingface_hub import hf_hub_download

    for name in ("model.safetensors", "config.json"):  # as `hf download` would
        hf_hub_download("acme/off", name, revision=commit, cache_dir=tmp_path / "hf-cache", endpoint=hub.url)
    asked = len(hub.requests)
    only_hub = recipe('name: offl\nsteps:\n  w: {kind: weights, source: "hf://acme/off@main"}\n', name="hub.yaml")
    (path.parent / "hub.lock").write_text((path.parent / "recipe.lock").read_text())
    r = run_cli("build", only_hub, "--offline", "--json", env=fresh)
    assert r.code == 0, r
    assert len(hub.requests) == asked
    from snapbuild.store import Store

    [p] = plan(only_hub, store=Store(tmp_path / "fresh"), offline=True)
    assert p.steps["w"].action == "cached"
    assert files_of(Store(tmp_path / "fresh"), p.steps["w"].artifact) == {"model.safetensors": b"\x05" * 4000,
                                                                          "config.json": b"{}"}

    # a source the lock file pins differently cannot be resolved offline
    moved = recipe(path.read_text().replace("acme/off@main", "acme/off@v2"), name="recipe.yaml")
    r = run_cli("build", moved, "--offline", env=dead)
    assert r.code == 3 and "recipe.lock pins hf://acme/off@main, the recipe now says hf://acme/off@v2" in r.err, r
