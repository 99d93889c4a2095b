"""A restore on an empty node writes the checkpoint's images straight from the
registry to their place (store/direct.py, runner/pull.py ``direct``), against the real
OCI registry and CRIU: the node's store never holds those chunks, what it does hold
verifies, a restore after the images were lost (tmpfs after a reboot) fetches them
again, a pull ahead of time completes the store, a registry that fails midway leaves
nothing half-written visible, and a restore killed at random moments is completed by
the next.

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
from snapbuild.runner.pull import pull
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import layout
from snapbuild.runtime.trees import MARKER
from snapbuild.store import Store
from snapbuild.store.snapshot import load_config, parse_manifest, referenced_blobs
from snapbuild.store.tree import load_tree

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
    url = f"oci://{oci_registry}/direct{time.monotonic_ns()}"
    manifest = parse_manifest(store.blobs.get(res.snapshot), res.snapshot)
    push(open_registry(url), parse_ref("heavy:v1"), res.snapshot, referenced_blobs(manifest), store.blobs)
    return url, port


def whole_file_chunks(node: Store, tree: str) -> set[str]:
    return {ref["digest"] for e in load_tree(node.blobs, tree)["entries"] for ref in e.get("chunks", ())
            if "digest" in ref and "offset" not in ref}


def forget_written_out() -> None:
    """What restores wrote out on this machine, gone, as on an empty node (the input
    trees) or after a reboot (the images, on tmpfs)."""
    from snapbuild.runtime.trees import discard

    root = Path(os.environ["SNAPBUILD_RUN_ROOT"])
    for trees in (root / "trees", layout.images_root(root) / "trees"):
        for p in trees.iterdir() if trees.exists() else ():
            discard(p)


def images_tree(node: Store, out: dict) -> str:
    manifest = json.loads(node.blobs.get(out["digest"]))
    return load_config(node.blobs, manifest)["runtime"]["artifact"]


def test_the_checkpoint_goes_from_the_registry_to_its_place_without_a_copy_in_the_store(published, tmp_path,
                                                                                          monkeypatch):
    url, port = published
    monkeypatch.setenv("SNAPBUILD_PULL_DIRECT", "off")
    first = run("heavy:v1", registry=url, store=Store(tmp_path / "stored"), fallback="fail")
    stop(first["pid"])
    assert "written_straight_out" not in first["fetch"]
    monkeypatch.delenv("SNAPBUILD_PULL_DIRECT")  # the default
    forget_written_out()  # an empty node has none of what the first restore wrote out
    node = Store(tmp_path / "node")
    out = run("heavy:v1", registry=url, store=node, fallback="fail")
    try:
        assert out["mode"] == "restore", out
        assert post(port, "/count")["count"] == 3
    finally:
        stop(out["pid"])
    straight = out["fetch"]["written_straight_out"]
    assert straight["blobs"] > 0 and straight["bytes"] > 0, out["fetch"]
    # the same bytes came over the wire, fewer of them into the store
    assert out["fetch"]["bytes_fetched"] + straight["bytes"] == first["fetch"]["bytes_fetched"]
    chunks = whole_file_chunks(node, images_tree(node, out))
    assert chunks and not any(node.blobs.has(d) for d in chunks), "the images' chunks were stored after all"
    manifest = json.loads(node.blobs.get(out["digest"]))
    weights = load_config(node.blobs, manifest)["runtime"]["server"]["inputs"]["data"]
    assert not any(node.blobs.has(d) for d in whole_file_chunks(node, weights)), "nor the 48 MiB input's"
    assert node.verify().ok, "a pin that left chunks out on purpose is not broken"


def test_lost_trees_are_fetched_again_and_a_pull_ahead_completes_the_store(published, tmp_path):
    url, port = published
    node = Store(tmp_path / "node")
    forget_written_out()  # the build wrote the inputs out on this machine
    out = run("heavy:v1", registry=url, store=node, fallback="fail")
    stop(out["pid"])
    assert out["fetch"]["written_straight_out"]["blobs"] > 0
    forget_written_out()  # say, the node's disks were wiped but for the store
    again = run("heavy:v1", registry=url, store=node, fallback="fail")
    try:
        assert again["mode"] == "restore", again
        assert again["fetch"]["blobs_fetched"] == 0, "the store had all it keeps"
        assert again["fetch"]["written_straight_out"] == out["fetch"]["written_straight_out"]
        assert post(port, "/count")["count"] == 3
    finally:
        stop(again["pid"])
    ahead = pull("heavy:v1", registry=url, store=node)  # for a restore later, without the registry
    assert ahead["blobs_fetched"] == out["fetch"]["written_straight_out"]["blobs"]
    assert all(node.blobs.has(d) for d in whole_file_chunks(node, images_tree(node, out)))
    assert not node.pinned_direct("pulled:heavy") and node.verify().ok


def test_a_registry_that_fails_while_the_images_are_written_leaves_nothing_half_written(published, tmp_path,
                                                                                         monkeypatch):
    from snapbuild.registry.oci import OciRegistry

    url, port = published
    node = Store(tmp_path / "node")
    forget_written_out()  # the build wrote the inputs out on this machine
    probe = run("heavy:v1", registry=url, store=Store(tmp_path / "probe"), fallback="fail")
    stop(probe["pid"])
    later = set()  # the blobs only the write-out reads
    real = OciRegistry.get_blob
    straight = probe["fetch"]["written_straight_out"]["blobs"]
    assert straight > 1
    root = layout.images_root(Path(os.environ["SNAPBUILD_RUN_ROOT"]))
    forget_written_out()
    calls: list[str] = []
    fetched_by_pull = probe["fetch"]["blobs_fetched"]

    def get_blob(self, name, digest, **kw):
        calls.append(digest)
        if len(calls) == fetched_by_pull + 2:  # the second chunk the write-out asks for
            later.add(digest)
            raise OSError("connection reset by peer")
        return real(self, name, digest, **kw)

    monkeypatch.setattr(OciRegistry, "get_blob", get_blob)
    with pytest.raises(OSError, match="connection reset by peer"):
        run("heavy:v1", registry=url, store=node, fallback="fail", jobs=2)
    assert later, "the failure should land in the write-out"
    assert port_free(port), "neither a restore nor a cold boot"
    trees = root / "trees"
    visible = [p for p in trees.iterdir() if not p.name.startswith(".")] if trees.exists() else []
    assert all((p / MARKER).exists() for p in visible), f"an images folder is there only complete: {visible}"
    monkeypatch.setattr(OciRegistry, "get_blob", real)
    out = run("heavy:v1", registry=url, store=node, fallback="fail")
    try:
        assert out["mode"] == "restore" and post(port, "/count")["count"] == 3
        # the trees completed before the failure stay: only the rest is fetched again
        assert out["fetch"]["blobs_fetched"] == 0 and 0 < out["fetch"]["written_straight_out"]["blobs"] <= straight
    finally:
        stop(out["pid"])


def test_a_restore_killed_at_any_moment_of_its_pull_is_completed_by_the_next(published, tmp_path):
    url, port = published
    env = {**os.environ, "SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_PULL_DIRECT": "on"}
    restore = [str(BIN / "snapbuild-runner"), "restore", "heavy:v1", "--registry", url, "--json"]
    rng = random.Random(11)
    for _ in range(3):
        proc = subprocess.Popen(restore, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        time.sleep(rng.uniform(0.05, 0.6))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for _ in range(100):  # a restore that finished before the kill left its server
            if port_free(port):
                break
            subprocess.run([str(BIN / "snapbuild-runner"), "stop", str(_listener(port))], env=env,
                           capture_output=True)
            time.sleep(0.05)
    r = subprocess.run(restore, capture_output=True, text=True, env=env, timeout=120)
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
