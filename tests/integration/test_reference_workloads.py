"""The reference workloads (recipes/examples/numpy-server.yaml and torch-mlp.yaml),
built for real and restored with the real CRIU: the restored server answers exactly
what the warm server would, with its warm state, and the cold boot answers the same.

The builds are shared by the tests of this module (one store, built once).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop
from snapbuild.store import Store

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "recipes" / "examples"


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
        for name in ("numpy-server", "torch-mlp"):
            ports[name] = free_port()
            [res] = build(EXAMPLES / f"{name}.yaml", store=store, sets={"port": ports[name]}, jobs=2)
            assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items() if r.error}
        yield store, ports
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("name", ["numpy-server", "torch-mlp"])
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


def test_torch_checkpoint_leaves_mapped_weights_out(built):
    store, _ = built
    from snapbuild.inspect import inspect_snapshot

    info = inspect_snapshot("torch-mlp:dev", store=store)
    sizes = {o["step"]: o["bytes"] for o in info["outputs"]}
    assert sizes["weights"] > 380 * 2**20
    # The weights are mapped from their read-only folder, so the dump holds far less
    # than the model: the process's own memory only.
    assert sizes["snap"] < sizes["weights"] * 0.6
    ck = info["checkpoint"]
    assert ck["file_backed_bytes"] > 300 * 2**20, "the mapped weights are resident but file-backed"
    assert abs(ck["anonymous_bytes"] - ck["pages_bytes"]) < 16 * 2**20, "the dump holds the anonymous memory"


def test_bench_reports_medians_and_speedup(built, run_cli):
    store, ports = built
    r = run_cli("bench", "numpy-server:dev", "--runs", "1", "--no-drop-caches", "--json",
                env={"SNAPBUILD_HOME": str(store.home), "SNAPBUILD_RUN_ROOT": str(store.home / "run-root")})
    assert r.code == 0, r
    out = r.json()
    assert out["answers_match"] is True and out["runs"] == 1
    assert out["cold_s"] > 0 and out["restore_s"] > 0 and out["speedup"] == out["warm"]["speedup"]
    assert out["page_cache_dropped"] is None
