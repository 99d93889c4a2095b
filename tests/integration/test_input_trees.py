"""Input trees in the run root are shared by every server of a machine: a server that
writes into one gets EROFS, at its warm-up (the build), after a restore and in a cold
boot, with the real CRIU; and the bookkeeping that does write there (a second store's
marker, gc) still works.

The server (written below) maps a file of its input tree, as a model server maps its
weights, so the checkpoint holds a file-backed mapping on the read-only mount; it tries
to write into the tree at start-up (its log says how that went) and on
``GET /try-write`` (the answer says).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import trees
from snapbuild.runtime.layout import TREE_MARKER
from snapbuild.runtime.mountinfo import is_mount_point
from snapbuild.store import Store

from test_criu_snapshots import load_runtime  # tests/integration/
from testkit import free_port, get, port_free

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")]

SERVER = r'''
import errno, hashlib, http.server, json, mmap, os, sys

here = os.path.dirname(os.path.abspath(__file__))  # $SNAPBUILD_INPUTS/app: the tree, through a link
weights = open(os.path.join(here, "weights.bin"), "rb")
mapped = mmap.mmap(weights.fileno(), 0, prot=mmap.PROT_READ)


def try_write():
    out = {}
    for what, path, mode in (("append", "weights.bin", "ab"), ("create", "new.txt", "wb")):
        try:
            with open(os.path.join(here, path), mode) as f:
                f.write(b"x")
            out[what] = "written"
        except OSError as e:
            out[what] = errno.errorcode.get(e.errno, str(e.errno))
    return out


print("at start: " + json.dumps(try_write(), sort_keys=True), flush=True)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/try-write":
            body = json.dumps(try_write(), sort_keys=True).encode()
        else:
            body = hashlib.sha256(mapped[:]).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''

REFUSED = {"append": "EROFS", "create": "EROFS"}


@pytest.fixture
def snapshot(recipe, store):
    """The server built and checkpointed; returns its port, the app tree's folder and its weights."""
    port = free_port()
    path = recipe(f"""
        name: scribbler
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            run: "{sys.executable} $SNAPBUILD_INPUTS/app/server.py {port}"
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
            exercise: [{{http: "GET /try-write"}}]
          snap: {{kind: checkpoint, process: server, verify: [{{http: "GET /weights"}}]}}
        publish: {{tag: "scribbler:v1"}}
    """)
    app = path.parent / "app"
    app.mkdir()
    (app / "server.py").write_text(SERVER)
    weights = os.urandom(1 << 20)
    (app / "weights.bin").write_bytes(weights)
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    server = load_runtime(store, "scribbler:v1")["server"]
    tree = Path(server["run_root"]) / "trees" / server["inputs"]["app"].split(":")[1]
    return port, tree, weights, Path(server["run_dir"]) / "server.log"


def untouched(tree: Path, weights: bytes) -> None:
    assert (tree / "weights.bin").read_bytes() == weights, "the shared weights file was written to"
    assert sorted(p.name for p in tree.iterdir()) == sorted([TREE_MARKER, "server.py", "weights.bin"])


def test_a_server_cannot_write_into_its_input_tree_at_warm_up_restore_or_cold_boot(snapshot, store):
    port, tree, weights, log = snapshot
    assert f"at start: {json.dumps(REFUSED, sort_keys=True)}" in log.read_text(), log.read_text()
    untouched(tree, weights)
    assert is_mount_point(tree), "the warm-up's input tree is shown read-only"

    restored = run("scribbler:v1", store=store)
    try:
        assert restored["mode"] == "restore" and restored["verify"] == "same", restored
        assert json.loads(get(port, "/try-write")) == REFUSED
    finally:
        stop(restored["pid"])
    cold = run("scribbler:v1", store=store, mode="cold")
    try:
        assert cold["mode"] == "cold"
        assert json.loads(get(port, "/try-write")) == REFUSED
    finally:
        stop(cold["pid"])
    assert log.read_text().count(f"at start: {json.dumps(REFUSED, sort_keys=True)}") == 2, "warm-up and cold boot"
    untouched(tree, weights)
    assert port_free(port)


def test_a_tree_left_writable_by_a_restart_is_shown_read_only_again_and_restores(snapshot, store):
    port, tree, weights, _ = snapshot
    trees._unmount(tree)  # what a reboot does to the mount (the files stay)
    assert not is_mount_point(tree)
    restored = run("scribbler:v1", store=store)
    try:
        assert restored["mode"] == "restore", restored
        assert is_mount_point(tree) and json.loads(get(port, "/try-write")) == REFUSED
    finally:
        stop(restored["pid"])
    untouched(tree, weights)


def test_the_users_of_a_read_only_tree_are_still_recorded_and_it_goes_with_the_last(snapshot, store, tmp_path):
    _, tree, weights, _ = snapshot
    other = Store(tmp_path / "other-home")
    digest = "sha256:" + tree.name
    shutil.copytree(store.blobs.root / "blobs", other.blobs.root / "blobs")  # a second store of the same tree
    path, created = trees.ensure_tree(other.blobs, digest, tree.parent.parent)
    assert (path, created) == (tree, False)
    assert (tree / TREE_MARKER).read_text().splitlines() == [str(store.blobs.root), str(other.blobs.root)]
    assert is_mount_point(tree), "read-only again after the marker was written"
    with pytest.raises(OSError, match="Read-only file system"):
        (tree / "new.txt").write_text("x")

    assert trees.release(tree, other.blobs.root) is False, "kept for the first store"
    assert (tree / TREE_MARKER).read_text().splitlines() == [str(store.blobs.root)] and is_mount_point(tree)
    assert trees.release(tree, store.blobs.root) is True
    assert not is_mount_point(tree) and not tree.exists(), "unmounted, then removed"
