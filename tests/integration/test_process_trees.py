"""Process trees against the real CRIU: a server with spawned and forked children that
share memory, semaphores, pipes and sockets through /dev/shm, memfd, eventfd, epoll and
socketpairs (tests/integration/data/mp_server.py) restores on a clean node, a new
store with none of its /dev/shm files left, and answers as its cold boot does.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import process, shmfiles
from snapbuild.schema import Runtime
from snapbuild.store import Store
from snapbuild.store.chunks import read_file
from snapbuild.store.tree import load_tree

from testkit import free_port, get, port_free, post  # tests/integration/testkit.py

pytestmark = pytest.mark.integration

MP_SERVER = Path(__file__).parent / "data" / "mp_server.py"


def tree_recipe(recipe, port: int) -> Path:
    path = recipe(f"""
        name: mptree
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            command: ["{sys.executable}", "$SNAPBUILD_INPUTS/app/mp_server.py", --port, "{port}"]
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 60}}
            exercise: [{{http: "POST /count", repeat: 2}}, {{http: "POST /infer"}}]
          snap: {{kind: checkpoint, process: server}}
        publish: {{tag: "mptree:v1"}}
    """)
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(MP_SERVER, path.parent / "app" / "mp_server.py")
    return path


def checkpoint_json(store: Store, artifact: str) -> dict:
    entry = next(e for e in load_tree(store.blobs, artifact)["entries"] if e["path"] == "checkpoint.json")
    return json.loads(read_file(store.blobs, entry))


def test_a_multiprocessing_tree_restores_on_a_clean_node_and_answers_as_a_cold_boot(recipe, store, tmp_path):
    port = free_port()
    [res] = build(tree_recipe(recipe, port), store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    assert port_free(port)
    ckpt = Runtime.from_json(checkpoint_json(store, res.steps["snap"].artifact))
    names = {f["name"] for f in ckpt.shm_files}
    assert ckpt.format == 2 and len(ckpt.pids) >= 5, "parent, two spawned workers, a pool of two"
    assert any(n.startswith("psm_") for n in names), f"the shared_memory ring travels: {names}"
    assert any(n.startswith("link_remap.") for n in names), f"deleted semaphores travel as link-remap files: {names}"
    left = sorted(n for n in names if (shmfiles.SHM / n).exists())
    assert not left, f"the build leaves none of the tree's /dev/shm files behind: {left}"

    node = Store(tmp_path / "node")  # a clean node: a new store, nothing of the build in /dev/shm
    out = run("mptree:v1", registry=f"file://{store.home / 'registry'}", store=node, fallback="fail")
    try:
        assert out["mode"] == "restore", out
        assert len(process.tree(out["pid"])) == len(ckpt.pids), "every process of the tree came back"
        assert post(port, "/count")["count"] == 3, "the warm counter (shared memory) survived"
        warm = [post(port, "/infer") for _ in range(3)]
        assert not any((shmfiles.SHM / n).exists() for n in names if n.startswith("link_remap.")), \
            "CRIU removes the link-remap files it restored from"
    finally:
        stop(out["pid"])
        process.wait_gone(process.tree(out["pid"]), timeout=10)
    cold = run("mptree:v1", registry=f"file://{store.home / 'registry'}", store=node, mode="cold")
    try:
        assert cold["mode"] == "cold" and post(port, "/count")["count"] == 1
        assert warm == [post(port, "/infer") for _ in range(3)], "restored and cold servers answer alike"
    finally:
        stop(cold["pid"])


def test_a_socket_to_a_process_outside_the_tree_is_named_at_build_time(recipe, store, tmp_path):
    """CRIU cannot carry a unix connection whose peer is outside the server's tree: the
    build says so in words, with what to change, not only CRIU's log line."""
    port, sock = free_port(), tmp_path / "sidecar.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    path = recipe(f"""
        name: peer
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            command: ["{sys.executable}", "$SNAPBUILD_INPUTS/app/peer_server.py", "{port}", "{sock}"]
            ready: {{http: "http://127.0.0.1:{port}/", timeout: 30}}
          snap: {{kind: checkpoint, process: server}}
    """)
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(Path(__file__).parent / "data" / "peer_server.py", path.parent / "app" / "peer_server.py")
    try:
        [res] = build(path, store=store)
    finally:
        for s in [listener, *accepted]:
            s.close()
    snap = res.steps["snap"]
    assert snap.status == "failed"
    assert "holds a unix socket connected to a process outside its tree" in snap.error, snap.error
    assert "after_restore" in (snap.hint or ""), snap.hint
    assert port_free(port), "the server does not outlive the failed build"


def test_the_same_tree_in_a_runc_container_restores_on_a_clean_node(base_rootfs, dockerd, recipe, project, store,
                                                                    tmp_path):
    """In runc the tree's /dev/shm is the container's own tmpfs, which the checkpoint
    carries; CRIU gets --link-remap from the bundle's CRIU configuration file."""
    port = free_port()
    (project / "app").mkdir(exist_ok=True)
    shutil.copy(MP_SERVER, project / "app" / "mp_server.py")
    path = recipe(f"""
        name: mptree-runc
        steps:
          base: {{kind: image, from: "rootfs:{base_rootfs}"}}
          app: {{kind: image, from: base, copy: {{"app/": /app/}}}}
          server:
            kind: warmup
            image: app
            command: [python3, /app/mp_server.py, --port, "{port}"]
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 60}}
            exercise: [{{http: "POST /count", repeat: 2}}, {{http: "POST /infer"}}]
          snap: {{kind: checkpoint, process: server, engine: runc}}
        publish: {{tag: "mptree-runc:v1"}}
    """)
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    node = Store(tmp_path / "node")
    reg = f"file://{store.home / 'registry'}"
    out = run("mptree-runc:v1", registry=reg, store=node, fallback="fail", publish="0")
    host_port = int(out["address"].rsplit(":", 1)[1])
    try:
        assert out["mode"] == "restore", out
        assert post(host_port, "/count")["count"] == 3, "the warm counter (shared memory) survived"
        warm = [post(host_port, "/infer") for _ in range(2)]
    finally:
        stop(out["container"])
    cold = run("mptree-runc:v1", registry=reg, store=node, mode="cold", publish="0")
    cold_port = int(cold["address"].rsplit(":", 1)[1])
    try:
        assert post(cold_port, "/count")["count"] == 1
        assert warm == [post(cold_port, "/infer") for _ in range(2)], "restored and cold containers answer alike"
    finally:
        stop(cold["container"])


FORK_SERVER = Path(__file__).parent / "data" / "fork_server.py"


def fork_recipe(recipe, port: int, *flags: str) -> Path:
    path = recipe(f"""
        name: forky
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            command: ["{sys.executable}", "$SNAPBUILD_INPUTS/app/fork_server.py", --port, "{port}", {", ".join(flags)}]
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
            exercise: [{{http: "POST /infer", repeat: 2}}]
          snap: {{kind: checkpoint, process: server}}
        publish: {{tag: "forky:v1"}}
    """, name=f"forky{''.join(flags)}.yaml")
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(FORK_SERVER, path.parent / "app" / "fork_server.py")
    return path


def get_json(port: int, path: str) -> dict:
    return json.loads(get(port, path))


def restore_on_a_clean_node(store: Store, tmp_path: Path) -> dict:
    return run("forky:v1", registry=f"file://{store.home / 'registry'}", store=Store(tmp_path / "node"),
               fallback="fail")


def test_a_child_forked_after_readiness_is_in_the_checkpoint(recipe, store, tmp_path):
    """The tree is taken at the dump, not at the probe: a helper the first request forks
    (a lazily started engine) is checkpointed and restored with the server."""
    port = free_port()
    [res] = build(fork_recipe(recipe, port, "--lazy"), store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    assert len(checkpoint_json(store, res.steps["snap"].artifact)["pids"]) == 2, "the server and its late helper"
    out = restore_on_a_clean_node(store, tmp_path)
    try:
        assert len(process.tree(out["pid"])) == 2, "the helper came back"
        warm = post(port, "/infer")["helper"]
    finally:
        stop(out["pid"])
        process.wait_gone(process.tree(out["pid"]), timeout=10)
    cold = run("forky:v1", registry=f"file://{store.home / 'registry'}", store=store, mode="cold")
    try:
        assert post(port, "/infer")["helper"] == warm, "the restored helper answers as a fresh one"
    finally:
        stop(cold["pid"])


def test_children_that_exit_around_the_dump_are_kept_as_zombies_or_left_out(recipe, store, tmp_path):
    """CRIU freezes the tree before it dumps it: a child that has exited but is not yet
    reaped is dumped as a zombie and restored as one, with its exit status for its
    parent; children forked and reaped in a loop while the dump runs (--churn) never
    break it, and the loop goes on after the restore."""
    port = free_port()
    [res] = build(fork_recipe(recipe, port, "--zombie", "--churn"), store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    out = restore_on_a_clean_node(store, tmp_path)
    try:
        assert out["mode"] == "restore", out
        before = get_json(port, "/churned")["churned"]
        assert get_json(port, "/reap") == {"reaped": True, "status": 7}, "the zombie's exit status came back"
        deadline = time.monotonic() + 10
        while get_json(port, "/churned")["churned"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get_json(port, "/churned")["churned"] > before, "the restored server keeps forking children"
    finally:
        stop(out["pid"])
        process.wait_gone(process.tree(out["pid"]), timeout=10)


def test_a_daemon_that_left_the_tree_holding_its_socket_fails_the_build(recipe, store):
    """A double-forked daemon in a session of its own keeps the listening socket: it is
    not in the checkpoint, and it would keep the port on the build machine."""
    port = free_port()
    [res] = build(fork_recipe(recipe, port, "--escape"), store=store)
    snap = res.steps["snap"]
    assert snap.status == "failed", snap
    assert f"holds the server's socket TCP 127.0.0.1:{port} (listening) but is outside its process tree" \
        in snap.error, snap.error
    assert "no daemon mode" in (snap.hint or ""), snap.hint
    assert port_free(port), "the escaped daemon was stopped with the server"
