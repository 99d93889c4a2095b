"""A restore on an empty node writes its trees out while the pull goes on
(store/arriving.py, runner/restore.py), against the real OCI registry and CRIU:
the same result as pulling first, reads that wait for their blobs, a pull that fails
or is killed midway leaving nothing half-written visible and a store the next run
completes.

The snapshot: the counter server with a 48 MiB incompressible input, so a pull has
a dozen chunks to bring.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.registry import open_registry, parse_ref
from snapbuild.registry.transfer import push
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import layout
from snapbuild.runtime.trees import MARKER
from snapbuild.store import Store
from snapbuild.store.snapshot import parse_manifest, referenced_blobs

from testkit import free_port, port_free, post

pytestmark = pytest.mark.integration

COUNTER = Path(__file__).parent / "data" / "counter_server.py"
BIN = Path(sys.executable).parent


@pytest.fixture
def published(recipe, store, oci_registry):
    port = free_port()
    path = recipe(f"""
        name: heavy
        steps:
          app: {{kind: files, root: app}}
          data: {{kind: files, root: data}}
          server:
            kind: warmup
            needs: [app, data]
            run: "{sys.executable} $SNAPBUILD_INPUTS/app/counter_server.py --port {port}"
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
            exercise: [{{http: "POST /count", repeat: 2}}]
          snap: {{kind: checkpoint, process: server}}
        publish: {{tag: "heavy:v1"}}
    """)
    (path.parent / "app").mkdir()
    shutil.copy(COUNTER, path.parent / "app" / "counter_server.py")
    (path.parent / "data").mkdir()
    (path.parent / "data" / "w.bin").write_bytes(random.Random(3).randbytes(48 << 20))
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    url = f"oci://{oci_registry}/pipe{time.monotonic_ns()}"
    manifest = parse_manifest(store.blobs.get(res.snapshot), res.snapshot)
    push(open_registry(url), parse_ref("heavy:v1"), res.snapshot, referenced_blobs(manifest), store.blobs)
    return url, port


@pytest.fixture(autouse=True)
def _pipelined(monkeypatch):
    monkeypatch.setenv("SNAPBUILD_PULL_PIPELINE", "1")  # off by default (docs/benchmarks.md)
    # every blob through the arriving store (test_direct_pull has the default, and both together)
    monkeypatch.setenv("SNAPBUILD_PULL_DIRECT", "off")


def test_an_empty_node_restores_while_it_pulls_as_it_does_after(published, tmp_path, monkeypatch):
    url, port = published
    out = run("heavy:v1", registry=url, store=Store(tmp_path / "node-a"), fallback="fail")
    try:
        assert out["mode"] == "restore" and "pipelined" in out, out
        assert out["fetch"]["blobs_fetched"] > 12 and out["fetch"]["bytes_fetched"] > 48 << 20
        assert post(port, "/count")["count"] == 3
    finally:
        stop(out["pid"])
    monkeypatch.delenv("SNAPBUILD_PULL_PIPELINE")  # pull first (storing every blob, as above)
    before = run("heavy:v1", registry=url, store=Store(tmp_path / "node-b"), fallback="fail")
    try:
        assert before["mode"] == "restore" and "pipelined" not in before
        assert before["fetch"] == out["fetch"], "the same blobs either way"
        assert post(port, "/count")["count"] == 3
    finally:
        stop(before["pid"])


def test_writers_wait_for_blobs_a_slow_registry_has_not_sent_yet(published, tmp_path, monkeypatch):
    """Each blob takes 50 ms more to come: the trees are written out as they arrive."""
    from snapbuild.registry.oci import OciRegistry

    url, port = published
    slow = OciRegistry.get_blob

    def get_blob(self, name, digest, **kw):
        time.sleep(0.05)
        return slow(self, name, digest, **kw)

    monkeypatch.setattr(OciRegistry, "get_blob", get_blob)
    out = run("heavy:v1", registry=url, store=Store(tmp_path / "node"), fallback="fail", jobs=2)
    try:
        assert out["mode"] == "restore" and out["pipelined"]["reads_that_waited"] > 0, out
        assert post(port, "/count")["count"] == 3
    finally:
        stop(out["pid"])


def test_a_pull_that_fails_midway_starts_nothing_and_shows_nothing_half_written(published, tmp_path, monkeypatch):
    from snapbuild.registry.oci import OciRegistry

    url, port = published
    real, calls = OciRegistry.get_blob, []

    def get_blob(self, name, digest, **kw):
        calls.append(digest)
        if len(calls) == 8:
            raise OSError("connection reset by peer")
        return real(self, name, digest, **kw)

    monkeypatch.setattr(OciRegistry, "get_blob", get_blob)
    node = Store(tmp_path / "node")
    with pytest.raises(OSError, match="connection reset by peer"):
        run("heavy:v1", registry=url, store=node, jobs=2)
    assert port_free(port), "neither a restore nor a cold boot"
    trees = Path(os.environ["SNAPBUILD_RUN_ROOT"]) / "trees"
    visible = [p.name for p in trees.iterdir() if not p.name.startswith(".")] if trees.exists() else []
    assert all((trees / name / MARKER).exists() or layout.tree_users(trees / name).exists() for name in visible), \
        f"a tree folder is there only complete: {visible}"
    monkeypatch.setattr(OciRegistry, "get_blob", real)
    out = run("heavy:v1", registry=url, store=node, fallback="fail")
    try:
        assert out["mode"] == "restore" and post(port, "/count")["count"] == 3
        assert 0 < out["fetch"]["blobs_fetched"] < out["fetch"]["blobs_total"], "what came before is kept"
    finally:
        stop(out["pid"])


@pytest.mark.parametrize("how", [{"SNAPBUILD_PULL_PIPELINE": "1", "SNAPBUILD_PULL_DIRECT": "off"},
                                 {"SNAPBUILD_PULL_PIPELINE": "0", "SNAPBUILD_PULL_DIRECT": "on"},
                                 {"SNAPBUILD_PULL_PIPELINE": "1", "SNAPBUILD_PULL_DIRECT": "on"}],
                         ids=["while-pulling", "straight-out", "straight-out-while-pulling"])
def test_a_restore_killed_at_any_moment_of_its_pull_is_completed_by_the_next(published, tmp_path, how):
    url, port = published
    node = tmp_path / "node"
    env = {**os.environ, "SNAPBUILD_HOME": str(node), **how}
    rng = random.Random(11)
    for _ in range(3):
        proc = subprocess.Popen([str(BIN / "snapbuild-runner"), "restore", "heavy:v1", "--registry", url, "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        time.sleep(rng.uniform(0.05, 0.6))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for _ in range(100):  # a restore that finished before the kill left its server
            if port_free(port):
                break
            subprocess.run([str(BIN / "snapbuild-runner"), "stop", str(_listener(port))], env=env,
                           capture_output=True)
            time.sleep(0.05)
    r = subprocess.run([str(BIN / "snapbuild-runner"), "restore", "heavy:v1", "--registry", url, "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    try:
        assert out["mode"] == "restore", out
        assert post(port, "/count")["count"] == 3
    finally:
        stop(out["pid"])


def _listener(port: int) -> int:
    """The PID listening on 127.0.0.1:``port`` (from ss)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return int(out.split("pid=")[1].split(",")[0]) if "pid=" in out else 0
