"""The reference workloads (recipes/examples/numpy-server.yaml, torch-mlp.yaml,
torch-mlp-mmap.yaml and minilm-embedder.yaml), built for real and restored with the
real CRIU: the restored server answers exactly what the warm server would, with its
warm state, and the cold boot answers the same.

The builds are shared by the tests of this module (one store, built once). The mmap
and MiniLM examples mount their weights at fixed paths (/models/...), which needs root;
what these tests mounted is taken away at the end.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import mounts
from snapbuild.store import Store

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "recipes" / "examples"
WORKLOADS = ("numpy-server", "torch-mlp", "torch-mlp-mmap", "minilm-embedder")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infer(port: int) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/infer", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both workloads built into one store; the run root is shared like on a node."""
    home = tmp_path_factory.mktemp("ref-home")
    old = {k: os.environ.get(k) for k in ("SNAPBUILD_HOME", "SNAPBUILD_RUN_ROOT", "SNAPBUILD_IMAGE_CACHE")}
    os.environ["SNAPBUILD_HOME"] = str(home)
    os.environ["SNAPBUILD_RUN_ROOT"] = str(home / "run-root")
    os.environ["SNAPBUILD_IMAGE_CACHE"] = str(home / "image-cache")
    store = Store(home)
    ports = {}
    try:
        for name in WORKLOADS:
            ports[name] = free_port()
            [res] = build(EXAMPLES / f"{name}.yaml", store=store, sets={"port": ports[name]}, jobs=2)
            assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items() if r.error}
        yield store, ports
    finally:
        for point in ("/models/torch-mlp", "/models/minilm"):
            while mounts.is_mount_point(Path(point)):
                mounts.unmount(Path(point))
        for tree in (home / "run-root" / "trees").glob("*"):  # shown read-only (runtime.trees), outside tmp_path
            if mounts.is_mount_point(tree):
                mounts.unmount(tree)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def _node_run_root(request, _machine_dirs, monkeypatch):
    """A node restores with the run root the snapshots were built for (the runner
    refuses a snapshot of another run root)."""
    if "built" in request.fixturenames:
        store, _ = request.getfixturevalue("built")
        monkeypatch.setenv("SNAPBUILD_RUN_ROOT", str(store.home / "run-root"))


@pytest.mark.parametrize("name", ["numpy-server", "torch-mlp", "torch-mlp-mmap"])
def test_restored_server_answers_like_the_warm_one(built, name):
    store, ports = built
    port = ports[name]
    restored = run(f"{name}:dev", store=store)
    try:
        assert restored["mode"] == "restore", restored["reason"]
        warm_answer = infer(port)
        assert warm_answer["calls"] == 4, "3 warm-up calls were made before the checkpoint"
    finally:
        stop(restored["pid"])
    cold = run(f"{name}:dev", store=store, mode="cold")
    try:
        cold_answer = infer(port)
    finally:
        stop(cold["pid"])
    assert cold_answer["calls"] == 1
    assert cold_answer["digest"] == warm_answer["digest"], "restore and cold boot must compute the same"


def test_mapped_weights_stay_out_of_the_checkpoint(built):
    store, _ = built
    from snapbuild.inspect import inspect_snapshot

    copy, mapped = (inspect_snapshot(f"{n}:dev", store=store) for n in ("torch-mlp", "torch-mlp-mmap"))
    sizes = {o["step"]: o["bytes"] for o in copy["outputs"]}
    assert sizes["weights"] > 380 * 2**20
    assert copy["checkpoint"]["anonymous_bytes"] > sizes["weights"], "loaded the usual way, the weights are anonymous"
    # Mapped from the read-only mount, the weights stay file-backed: the dump holds
    # the process's own memory only.
    ck = mapped["checkpoint"]
    assert ck["file_backed_bytes"] > 300 * 2**20, "the mapped weights are resident but file-backed"
    assert ck["pages_bytes"] < sizes["weights"] * 0.6
    assert ck["pages_bytes"] < copy["checkpoint"]["pages_bytes"] - 300 * 2**20
    for info in (copy, mapped):
        ck = info["checkpoint"]
        assert abs(ck["anonymous_bytes"] - ck["pages_bytes"]) < 16 * 2**20, "the dump holds the anonymous memory"
    assert copy["checkpoint"]["anonymous_share"] > 0.7 and mapped["checkpoint"]["anonymous_share"] < 0.4


def test_inspect_says_how_much_of_a_checkpoint_is_anonymous_memory(built, run_cli):
    store, _ = built
    env = {"SNAPBUILD_HOME": str(store.home)}
    copy, mapped = (run_cli("inspect", f"{n}:dev", env=env) for n in ("torch-mlp", "torch-mlp-mmap"))
    assert copy.code == 0 and mapped.code == 0, (copy, mapped)
    assert re.search(r"anonymous memory +[\d.]+ MiB +in the checkpoint \(\d+% of its resident memory\)", copy.out)
    assert "tip: if weights are in the anonymous memory, memory-map them" in copy.out
    assert "tip:" not in mapped.out, "a small checkpoint needs no tip"


def embed(port: int, sentences: list[str]) -> dict:
    body = json.dumps({"sentences": sentences}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/embed", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_minilm_gives_the_same_embeddings_restored_and_cold(built):
    store, ports = built
    port, sentences = ports["minilm-embedder"], ["A cat sits on the mat.", "A kitten rests on a rug.", "Stock markets fell."]
    restored = run("minilm-embedder:dev", store=store)
    try:
        assert restored["mode"] == "restore", restored["reason"]
        warm = embed(port, sentences)
        assert warm["calls"] == 4, "3 warm-up calls were made before the checkpoint"
    finally:
        stop(restored["pid"])
    cold = run("minilm-embedder:dev", store=store, mode="cold")
    try:
        fresh = embed(port, sentences)
    finally:
        stop(cold["pid"])
    assert fresh["calls"] == 1 and fresh["digest"] == warm["digest"], "same model, same numbers"
    a, b, c = warm["embeddings"]
    assert len(a) == 384 and abs(sum(x * x for x in a) - 1) < 1e-4, "unit-length 384-dim embeddings"
    dot = lambda u, v: sum(x * y for x, y in zip(u, v, strict=True))  # noqa: E731
    assert dot(a, b) > dot(a, c) + 0.3, "a real sentence model: the cat is nearer the kitten than the stocks"


def test_bench_reports_medians_and_speedup(built, run_cli):
    store, ports = built
    r = run_cli("bench", "numpy-server:dev", "--runs", "1", "--no-drop-caches", "--json",
                env={"SNAPBUILD_HOME": str(store.home), "SNAPBUILD_RUN_ROOT": str(store.home / "run-root")})
    assert r.code == 0, r
    out = r.json()
    assert out["runs"] == 1
    # numpy-server's checkpoint step has no `verify:`: nothing to compare, and the report says so
    assert out["answers"]["compared"] is None and "no check requests" in out["answers"]["why"], out["answers"]
    assert out["cold_s"] > 0 and out["restore_s"] > 0 and out["speedup"] == out["warm"]["speedup"]
    assert out["page_cache_dropped"] is None
    own = out["warm"]["overhead"]  # the runner's own share of a warm restore, apart from CRIU's
    assert own["criu_s"] > 0 and 0 < own["own_s"] < out["restore_s"], own
    assert own["share_of_criu"] == round(own["own_s"] / own["criu_s"], 2)
    text = run_cli("bench", "numpy-server:dev", "--runs", "1", "--no-drop-caches",
                   env={"SNAPBUILD_HOME": str(store.home), "SNAPBUILD_RUN_ROOT": str(store.home / "run-root")})
    assert text.code == 0 and "a warm restore's own overhead (all but CRIU and the first probe)" in text.out, text
