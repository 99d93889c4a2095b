"""`mounts:` for host processes, with the real CRIU and real bind mounts (needs root).

A warm-up maps a weights file from a read-only bind mount; the build takes the mount
away again; the runner puts the same tree at the same path before it restores.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop
from snapbuild.runtime.gc import node_gc
from snapbuild.runtime import mounts
from snapbuild.runtime.layout import TREE_MARKER
from snapbuild.store import Store

from test_criu_snapshots import load_runtime
from testkit import free_port, post, weights_counter_recipe

pytestmark = pytest.mark.integration


def mapped_recipe(recipe, port: int, point: Path) -> tuple[Path, bytes]:
    return weights_counter_recipe(recipe, port, name="mapped", data="model", mount=point, size=3 << 20)


def test_a_mounted_input_is_read_only_and_follows_the_snapshot(recipe, store, mount_point, tmp_path, run_cli):
    port = free_port()
    path, weights = mapped_recipe(recipe, port, mount_point)
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    assert not mounts.is_mount_point(mount_point), "the build takes away the mount it made"
    server = load_runtime(store, "mapped:v1")["server"]
    assert server["mounts"] == {str(mount_point): "model"} and "model" in server["inputs"]

    node = Store(tmp_path / "node")  # a node that never saw the build's trees in its store
    reg = f"file://{store.home / 'registry'}"
    out = run("mapped:v1", registry=reg, store=node)
    try:
        assert out["mode"] == "restore", out
        assert mounts.is_mount_point(mount_point)
        info = post(port, "/count")
        assert info["digest"] == hashlib.sha256(weights).hexdigest()
        assert info["count"] == 3, "two warm-up calls happened before the checkpoint"
        assert info["read_only"] is True, "a mounted input cannot be written"
    finally:
        stop(out["pid"])
    assert not mounts.is_mount_point(mount_point), "no server uses it any more: the stop took it away"
    cold = run("mapped:v1", registry=reg, store=node, mode="cold")  # mounted again
    try:
        assert cold["mode"] == "cold" and post(port, "/count")["count"] == 1
        assert mounts.is_mount_point(mount_point)
    finally:
        stop(cold["pid"])
    assert not mounts.is_mount_point(mount_point)

    # a mount point this node uses otherwise: nothing starts, and it is the node's
    # problem (exit 11), not a usage error
    (mount_point / "mine").write_text("not the snapshot's")
    r = run_cli("restore", "mapped:v1", "--registry", reg, tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(node.home)})
    assert r.code == 11 and "the mount would hide its files" in r.err, r
    assert (mount_point / "mine").read_text() == "not the snapshot's"


def test_a_mount_never_hides_files_or_another_mount(tmp_path, mount_point):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "f").write_text(d.name)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("mine")
    with pytest.raises(mounts.MountError, match="not empty and the mount would hide its files"):
        mounts.bind_ro(a, busy)
    assert mounts.bind_ro(a, mount_point) is True
    assert mounts.bind_ro(a, mount_point) is False, "the same tree there already: reused, not mounted twice"
    with pytest.raises(mounts.MountError, match="already a mount point, of other content"):
        mounts.bind_ro(b, mount_point)
    assert (mount_point / "f").read_text() == "a" and mounts.mount_points_of(a) == [mount_point]
    with pytest.raises(OSError, match="Read-only file system"):
        (mount_point / "new").write_text("x")


def test_an_input_tree_left_mounted_is_replaced_once_unused(tmp_path, mount_point):
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        d.mkdir()
        (d / "w.bin").write_text(d.name)
        (d / TREE_MARKER).write_text("/some/store\n")  # input trees carry their marker
    mounts.bind_ro(old, mount_point)
    with open(mount_point / "w.bin"):  # a server still reads the old weights
        with pytest.raises(mounts.MountError, match="already a mount point"):
            mounts.bind_ro(new, mount_point)
    assert mounts.bind_ro(new, mount_point) is True, "unused now: replaced"
    assert (mount_point / "w.bin").read_text() == "new" and mounts.mount_points_of(old) == []


def test_a_mount_of_a_deleted_folder_is_replaced(tmp_path, mount_point):
    import shutil

    gone, new = tmp_path / "gone", tmp_path / "new"
    for d in (gone, new):
        d.mkdir()
        (d / "w.bin").write_text(d.name)
    mounts.bind_ro(gone, mount_point)  # not an input tree: only its deletion makes it stale
    shutil.rmtree(gone)
    assert mounts.bind_ro(new, mount_point) is True
    assert (mount_point / "w.bin").read_text() == "new"


def test_node_gc_takes_away_the_mounts_of_the_trees_it_removes(store, mount_point):
    run_root = Path(os.environ["SNAPBUILD_RUN_ROOT"])
    stale = run_root / "trees" / ("0" * 64)
    stale.mkdir(parents=True)
    (stale / "w.bin").write_bytes(b"x" * 100)
    (stale / ".snapbuild-complete").write_text(f"{store.home}\n")
    mounts.bind_ro(stale, mount_point)
    r = node_gc(store)
    assert r["trees_removed"] == 1 and not stale.exists()
    assert not mounts.is_mount_point(mount_point)


def test_a_mounted_step_is_an_input_and_its_path_is_in_the_key(recipe, mount_point):
    from snapbuild.recipe import load_recipe

    path, _ = mapped_recipe(recipe, free_port(), mount_point)
    text = path.read_text()
    [a] = load_recipe(path)
    path.write_text(text.replace(f'"{mount_point}": model', f'"{mount_point}2": model'))
    [b] = load_recipe(path)
    assert a.steps["server"].deps == b.steps["server"].deps and "model" in a.steps["server"].deps
    assert json.dumps(a.steps["server"].spec.key_fields()) != json.dumps(b.steps["server"].spec.key_fields())
