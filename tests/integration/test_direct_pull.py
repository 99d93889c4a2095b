"""A restore on an empty node writes the checkpoint's images straight from the
registry to their place (store/direct.py, runner/pull.py ``direct``), against the real
OCI registry and CRIU: the node's store never holds those chunks, what it does hold
verifies, a restore after the images were lost (tmpfs after a reboot) fetches them
again, a pull ahead of time completes the store, and a registry that fails midway
leaves nothing half-written visible. (Killed at random moments: test_pipelined_pull.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snapbuild.runner.pull import pull
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import layout
from snapbuild.runtime.trees import MARKER
from snapbuild.store import Store
from snapbuild.store.snapshot import load_config
from snapbuild.store.tree import load_tree

from test_pipelined_pull import published  # noqa: F401  (tests/integration/; a fixture)
from testkit import port_free, post

pytestmark = pytest.mark.integration


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
    manifest = __import__("json").loads(node.blobs.get(out["digest"]))
    return load_config(node.blobs, manifest)["runtime"]["artifact"]


def test_the_checkpoint_goes_from_the_registry_to_its_place_without_a_copy_in_the_store(published, tmp_path,  # noqa: F811
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
    manifest = __import__("json").loads(node.blobs.get(out["digest"]))
    weights = load_config(node.blobs, manifest)["runtime"]["server"]["inputs"]["data"]
    assert not any(node.blobs.has(d) for d in whole_file_chunks(node, weights)), "nor the 48 MiB input's"
    assert node.verify().ok, "a pin that left chunks out on purpose is not broken"


def test_lost_trees_are_fetched_again_and_a_pull_ahead_completes_the_store(published, tmp_path):  # noqa: F811
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


def test_a_registry_that_fails_while_the_images_are_written_leaves_nothing_half_written(published, tmp_path,  # noqa: F811
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


def test_straight_out_while_pulling_restores_as_straight_out_after(published, tmp_path, monkeypatch):  # noqa: F811
    """Both at once: the write-out starts once the config and trees are in, reads the
    packs the pull is still bringing as they arrive, and the rest from the registry."""
    url, port = published
    forget_written_out()
    monkeypatch.setenv("SNAPBUILD_PULL_PIPELINE", "1")
    out = run("heavy:v1", registry=url, store=Store(tmp_path / "a"), fallback="fail")
    try:
        assert out["mode"] == "restore" and "pipelined" in out, out
        assert post(port, "/count")["count"] == 3
    finally:
        stop(out["pid"])
    forget_written_out()
    monkeypatch.setenv("SNAPBUILD_PULL_PIPELINE", "0")
    after = run("heavy:v1", registry=url, store=Store(tmp_path / "b"), fallback="fail")
    try:
        assert after["mode"] == "restore" and "pipelined" not in after
        assert post(port, "/count")["count"] == 3
    finally:
        stop(after["pid"])
    assert out["fetch"]["written_straight_out"]["bytes"] > 48 << 20
    assert out["fetch"] == after["fetch"], "the same blobs stored, the same written straight out"
