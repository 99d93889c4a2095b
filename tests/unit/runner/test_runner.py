"""The runner pulls and verifies snapshots, and stays free of build-side imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from snapbuild.build import build
from snapbuild.errors import IntegrityError
from snapbuild.runner.pull import pull
from snapbuild.store import Store

BUILD_SIDE = ["click", "jinja2", "networkx", "pydantic", "yaml", "rich", "pathspec", "docker",
              "huggingface_hub", "snapbuild.recipe", "snapbuild.plan", "snapbuild.exec",
              "snapbuild.steps", "snapbuild.build", "snapbuild.cli"]


def test_runner_imports_no_build_side_module():
    code = ("import sys, snapbuild.runner.cli, snapbuild.runner.pull, snapbuild.runner.restore, "
            "snapbuild.engines.host, snapbuild.registry.file; "
            "import json; print(json.dumps(sorted(sys.modules)))")
    mods = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)
    loaded = [m for m in BUILD_SIDE if any(x == m or x.startswith(m + ".") for x in mods)]
    assert loaded == []


def test_pull_fetches_verified_blobs_and_writes_outputs(recipe, store, tmp_path):
    path = recipe("""
        name: demo
        steps:
          a: {kind: command, run: "mkdir d; echo hi > d/x; head -c 100000 /dev/zero > d/z", outputs: [d/]}
        publish: {tag: "demo:v"}
    """)
    [res] = build(path, store=store)
    node = Store(tmp_path / "node")
    out = pull("demo:v", registry=f"file://{store.home / 'registry'}", dest=tmp_path / "out", store=node)
    assert out["digest"] == res.snapshot and out["blobs_fetched"] >= 3
    assert (tmp_path / "out" / "a" / "d" / "x").read_text() == "hi\n"
    assert (tmp_path / "out" / "a" / "d" / "z").read_bytes() == bytes(100000)
    again = pull("demo:v", registry=f"file://{store.home / 'registry'}", store=node)
    assert again["blobs_fetched"] == 0, "a second pull fetches nothing"


NUMBERS = """
name: demo
steps:
  a: {kind: command, run: "seq 100000 > n.txt", outputs: [n.txt]}
publish: {tag: "demo:v"}
"""


def corrupt_largest_registry_blob(store):
    """Flip a byte in the registry's largest blob. The registry hard-links from the
    store, so the registry gets a private, corrupt copy and the store stays intact."""
    reg = store.home / "registry" / "demo" / "blobs" / "sha256"
    victim = max(reg.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[5] ^= 1
    victim.unlink()
    victim.write_bytes(bytes(data))
    return victim


def test_pull_refuses_a_corrupt_registry_blob(recipe, store, tmp_path):
    build(recipe(NUMBERS), store=store)
    corrupt_largest_registry_blob(store)
    with pytest.raises(IntegrityError):
        pull("demo:v", registry=f"file://{store.home / 'registry'}", dest=tmp_path / "out",
             store=Store(tmp_path / "node"))
    assert not (tmp_path / "out" / "a" / "n.txt").exists()


def test_corrupt_registry_blob_hint_names_the_file(recipe, store, tmp_path):
    path = recipe(NUMBERS)
    build(path, store=store)
    victim = corrupt_largest_registry_blob(store)
    with pytest.raises(IntegrityError) as info:
        pull("demo:v", registry=f"file://{store.home / 'registry'}", store=Store(tmp_path / "node"))
    assert f"rm {victim}" in info.value.hint
    victim.unlink()  # as the hint says; then publishing again repairs the registry
    build(path, store=store)
    assert pull("demo:v", registry=f"file://{store.home / 'registry'}", store=Store(tmp_path / "node"))
