"""Tree images: input trees with many files ship as EROFS images too, and a node that
can mount them fetches the image instead of the tree's chunks and mounts it where the
tree would be written out (real mkfs.erofs, the kernel's EROFS, CRIU)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.errors import SnapbuildError
from snapbuild.runner.pull import pull
from snapbuild.runner.restore import run, stop
from snapbuild.runtime.gc import node_gc
from snapbuild.runtime import erofs
from snapbuild.runtime import layout
from snapbuild.runtime.layout import tree_dir
from snapbuild.schema import TreeImages
from snapbuild.runtime.trees import discard, release
from snapbuild.store import Store
from snapbuild.store.snapshot import image_selection
from snapbuild.store.tree import load_tree, tree_blobs

from testkit import COUNTER, free_port, kill_counter_restore, post, weights_counter_recipe

pytestmark = pytest.mark.integration

MiB = 1 << 20


def test_the_same_tree_always_gives_the_same_image(tmp_path):
    """Written out twice, a second apart (other times, other inode numbers): one image."""
    src = tmp_path / "src"
    for i in range(40):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i}.py").write_text(f"x = {i}\n")
    os.symlink("d0/f0.py", src / "link")
    copies = []
    for n in (1, 2):
        dest = tmp_path / f"copy{n}"
        shutil.copytree(src, dest, symlinks=True, copy_function=shutil.copy)  # new times
        os.utime(dest / "d1" / "f1.py", (n * 1000, n * 1000))
        erofs.make(dest, tmp_path / f"image{n}", exclude=("d3/f3.py",))
        copies.append((tmp_path / f"image{n}").read_bytes())
    assert copies[0] == copies[1]
    mnt = tmp_path / "mnt"
    erofs.mount(tmp_path / "image1", mnt)
    try:
        assert erofs.is_image_mount(mnt)
        assert (mnt / "d2" / "f6.py").read_text() == "x = 6\n" and os.readlink(mnt / "link") == "d0/f0.py"
        assert not (mnt / "d3" / "f3.py").exists(), "excluded"
        assert os.stat(mnt / "d1" / "f1.py").st_mtime == 0 and os.stat(mnt / "d1" / "f1.py").st_uid == 0
    finally:
        assert erofs.unmount(mnt)


def test_a_layer_image_keeps_times_owners_and_overlay_marks(tmp_path):
    src = tmp_path / "layer"
    (src / "opaque").mkdir(parents=True)
    (src / "app.py").write_text("print(1)\n")
    os.utime(src / "app.py", (1_000_000_000, 1_000_000_000))
    os.chown(src / "app.py", 1000, 1000)
    os.setxattr(src / "opaque", "trusted.overlay.opaque", b"y")
    os.mknod(src / "gone", 0o020000, os.makedev(0, 0))  # a whiteout
    erofs.make(src, tmp_path / "a.img", keep_owners=True)
    erofs.make(src, tmp_path / "b.img", keep_owners=True)
    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    mnt = tmp_path / "mnt"
    erofs.mount(tmp_path / "a.img", mnt)
    try:
        st = os.stat(mnt / "app.py")
        assert (st.st_mtime, st.st_uid, st.st_gid) == (1_000_000_000, 1000, 1000)
        assert os.getxattr(mnt / "opaque", "trusted.overlay.opaque") == b"y"
        assert os.stat(mnt / "gone").st_rdev == 0 and os.path.exists(mnt / "gone")
    finally:
        erofs.unmount(mnt)


def lib_recipe(recipe, project: Path, port: int) -> tuple[Path, bytes]:
    """The counter server with an input tree of 300 files, one of them mapped."""
    lib = project / "lib"
    for i in range(300):
        (lib / f"pkg{i % 10}").mkdir(parents=True, exist_ok=True)
        (lib / f"pkg{i % 10}" / f"mod{i}.py").write_text(f"VALUE = {i}\n" * 20)
    return weights_counter_recipe(recipe, port, name="libcounter", data="lib")


@pytest.fixture(autouse=True)
def _images_from_unverified_snapshots(monkeypatch):
    """Most tests here are about mounting, not trust: the node mounts images of
    unsigned snapshots too (the default takes a trust policy: see the tests below)."""
    monkeypatch.setenv("SNAPBUILD_TREE_IMAGES", "always")


def _trusting(tmp_path, store, ref: str):
    """Sign ``ref`` in the store's registry; the path of a policy that trusts the key."""
    from snapbuild.registry import open_registry, parse_ref
    from snapbuild.signing import keygen, sign

    priv, pub = keygen(tmp_path / "ci.key")
    sign(open_registry(f"file://{store.home / 'registry'}"), parse_ref(ref), priv)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"snapshots": {ref.split(":")[0]: [str(pub)]}}))
    return policy


@pytest.fixture
def lib_snapshot(recipe, project, store):
    """The snapshot built, and the trees its build wrote out under the run root (which
    the node shares, this being one machine) deleted: the node starts empty."""
    port = free_port()
    path, weights = lib_recipe(recipe, project, port)
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    root = Path(os.environ["SNAPBUILD_RUN_ROOT"])
    for step in ("app", "lib"):
        discard(tree_dir(root, res.steps[step].artifact))
    return port, weights, res


def test_an_empty_node_mounts_the_image_instead_of_writing_the_tree(lib_snapshot, store, tmp_path, monkeypatch):
    """The default: images are mounted from a snapshot the node's trust policy accepted."""
    monkeypatch.setenv("SNAPBUILD_TREE_IMAGES", "1")
    monkeypatch.setenv("SNAPBUILD_TRUST_POLICY", str(_trusting(tmp_path, store, "libcounter:v1")))
    port, weights, res = lib_snapshot
    config = pull("libcounter:v1", store=store)["config"]
    lib = res.steps["lib"].artifact
    images = config["tree_images"]
    assert images["format"] == "erofs" and list(images["trees"]) == [lib], "app (1 file) is written out as it is"
    image = images["trees"][lib]

    node = Store(tmp_path / "node")
    reg = f"file://{store.home / 'registry'}"
    out = run("libcounter:v1", registry=reg, store=node)
    try:
        assert out["mode"] == "restore" and out["tree_images"] == "used", out
        answer = post(port, "/count")
        assert answer["count"] == 3 and answer["digest"] == hashlib.sha256(weights).hexdigest()
        assert answer["read_only"], "the mapped file lives on the read-only image"
        lib_dir = tree_dir(Path(config["runtime"]["server"]["run_root"]), lib)
        assert erofs.is_image_mount(lib_dir)
        assert (lib_dir / "pkg3" / "mod13.py").read_text() == "VALUE = 13\n" * 20
        # The node fetched the image, not the tree's own chunks.
        lib_chunks = set(tree_blobs(load_tree(node.blobs, lib)))
        assert lib_chunks and not any(node.blobs.has(d) for d in lib_chunks)
        # ... and wrote the image straight out from the registry: its chunks are not stored either
        image_chunks = set(tree_blobs(load_tree(node.blobs, image)))
        assert image_chunks and not any(node.blobs.has(d) for d in image_chunks)
        assert out["fetch"]["written_straight_out"]["blobs"] >= len(image_chunks)
        assert node.verify().ok, "a pull of images is complete as far as the node's store is concerned"
        again = pull("libcounter:v1", registry=reg, store=node, images=True, direct=True)  # as a restore pulls
        assert again["blobs_fetched"] == 0 and again["tree_images"]
    finally:
        stop(out["pid"])
    # A node that does not use images fetches the tree's chunks after all (and, pulling
    # ahead, what the restore wrote straight out).
    full = pull("libcounter:v1", registry=reg, store=node, images=False)
    assert full["blobs_fetched"] >= len(lib_chunks) and not full["tree_images"]
    assert all(node.blobs.has(d) for d in lib_chunks)

    # Let go: unmounted, image file and users file gone.
    image_file = layout.image_file(lib_dir)
    assert image_file.is_file()
    assert release(lib_dir, node.home) is True
    assert not erofs.is_image_mount(lib_dir) and not lib_dir.exists() and not image_file.exists()
    assert not lib_dir.with_name(lib_dir.name + ".users").exists()


def test_images_of_an_unverified_snapshot_are_not_mounted(lib_snapshot, store, tmp_path, monkeypatch):
    """The kernel parses what it mounts: without a trust policy that accepted the
    snapshot (and without SNAPBUILD_TREE_IMAGES=always), the trees are written out."""
    monkeypatch.setenv("SNAPBUILD_TREE_IMAGES", "1")
    monkeypatch.delenv("SNAPBUILD_TRUST_POLICY", raising=False)
    port, _, res = lib_snapshot
    node = Store(tmp_path / "node")
    out = run("libcounter:v1", registry=f"file://{store.home / 'registry'}", store=node)
    try:
        assert out["mode"] == "restore" and out["tree_images"].startswith("not used: the snapshot is not verified")
        lib_dir = tree_dir(Path(os.environ["SNAPBUILD_RUN_ROOT"]), res.steps["lib"].artifact)
        assert lib_dir.is_dir() and not erofs.is_image_mount(lib_dir)
        assert post(port, "/count")["count"] == 3
    finally:
        stop(out["pid"])


def test_a_node_that_cannot_mount_images_writes_the_trees_out(lib_snapshot, store, tmp_path, monkeypatch):
    port, weights, res = lib_snapshot
    lib = res.steps["lib"].artifact

    def refuse(image, dest):
        raise erofs.ImageUnusable(f"cannot mount the tree image {image}: no EROFS here (test)")

    monkeypatch.setattr(erofs, "mount", refuse)
    node = Store(tmp_path / "node")
    out = run("libcounter:v1", registry=f"file://{store.home / 'registry'}", store=node)
    try:
        assert out["mode"] == "restore" and out["tree_images"].startswith("not used: cannot mount"), out
        answer = post(port, "/count")
        assert answer["count"] == 3 and answer["digest"] == hashlib.sha256(weights).hexdigest()
        lib_dir = tree_dir(Path(os.environ["SNAPBUILD_RUN_ROOT"]), lib)
        assert not erofs.is_image_mount(lib_dir) and (lib_dir / "pkg1" / "mod1.py").is_file()
        # the tree was fetched instead: its packed files into the store, its big ones straight out
        refs = [r for e in load_tree(node.blobs, lib)["entries"] for r in e.get("chunks", ()) if "digest" in r]
        assert all(node.blobs.has(r["digest"]) == ("offset" in r) for r in refs)
        assert out["fetch"]["written_straight_out"]["blobs"] > 0
        assert not layout.image_file(lib_dir).exists(), "no half-used image left"
    finally:
        stop(out["pid"])


def test_images_can_be_turned_off_at_build_and_on_the_node(recipe, project, store, tmp_path, monkeypatch, run_cli):
    port = free_port()
    path, _ = lib_recipe(recipe, project, port)
    monkeypatch.setenv("SNAPBUILD_TREE_IMAGES", "0")
    [res] = build(path, store=store)
    assert res.ok
    assert "tree_images" not in pull("libcounter:v1", store=store)["config"]
    assert not erofs.can_mount() and not erofs.can_build()
    # Without mkfs.erofs the build says what it does without, and how to get it.
    monkeypatch.setenv("SNAPBUILD_TREE_IMAGES", "1")
    monkeypatch.setenv("SNAPBUILD_MKFS_EROFS", "/nonexistent/mkfs.erofs")
    (project / "app" / "counter_server.py").write_text(COUNTER.read_text() + "# v2\n")
    r = run_cli("build", path, "--progress", "plain", timeout=300)
    assert r.code == 0, r
    assert "tree images: none (mkfs.erofs is not installed: `apt-get install erofs-utils`)" in r.out + r.err


def test_node_gc_unmounts_images_no_snapshot_needs(lib_snapshot, store, tmp_path):
    port, _, res = lib_snapshot
    node = Store(tmp_path / "node")
    out = run("libcounter:v1", registry=f"file://{store.home / 'registry'}", store=node)
    try:
        root = Path(os.environ["SNAPBUILD_RUN_ROOT"])
        lib_dir = tree_dir(root, res.steps["lib"].artifact)
        assert erofs.is_image_mount(lib_dir)
        leftover = root / "tree-images" / ("0" * 64 + ".erofs")  # a write-out cut short
        leftover.write_bytes(b"partial")
        assert node_gc(node)["trees_removed"] == 0, "the pinned snapshot still needs its trees"
        assert erofs.is_image_mount(lib_dir) and not leftover.exists()
        for pin in node.pin_files():
            pin.unlink()
        # No pin any more, but the server maps a file of the mounted tree: gc leaves it.
        busy = node_gc(node)
        assert str(lib_dir) in busy["in_use"], busy
        assert erofs.is_image_mount(lib_dir) and post(port, "/count")["count"] == 3
    finally:
        stop(out["pid"])
    assert node_gc(node)["trees_removed"] >= 1
    assert not erofs.is_image_mount(lib_dir) and not any((root / "tree-images").iterdir())


def test_image_selection_skips_only_chunks_no_other_tree_needs(store, tmp_path):
    """The selection as such: a chunk that an imaged tree shares with another is kept."""
    from snapbuild.store.snapshot import assemble, load_config
    from snapbuild.store.tree import build_tree

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "shared.bin").write_bytes(b"s" * (2 * MiB))
    (a / "own.bin").write_bytes(os.urandom(2 * MiB))
    ta, _ = build_tree(store.blobs, [(p.name, p) for p in sorted(a.iterdir())])
    tb, _ = build_tree(store.blobs, [(p.name, p) for p in sorted(b.iterdir())])
    (tmp_path / "img").write_bytes(os.urandom(MiB + 5))
    ti, _ = build_tree(store.blobs, [(erofs.FILE, tmp_path / "img")])
    digest, _ = assemble(store.blobs, name="x", variant={}, steps=[], outputs={"a": ta, "b": tb},
                         tree_images=TreeImages(trees={ta: ti}))
    manifest = json.loads(store.blobs.get(digest))
    chosen = image_selection(store.blobs, manifest, load_config(store.blobs, manifest))
    own = set(tree_blobs(load_tree(store.blobs, ta))) - set(tree_blobs(load_tree(store.blobs, tb)))
    assert own and not own & chosen
    assert set(tree_blobs(load_tree(store.blobs, tb))) <= chosen, "b's chunks (shared with a) stay"
    assert set(tree_blobs(load_tree(store.blobs, ti))) <= chosen and {ta, tb, ti} <= chosen


def test_images_are_lz4_compressed_by_default_and_read_back_the_same(tmp_path, monkeypatch):
    """The kernel decompresses a block when it is first read: a node writes out half the
    bytes (docs/benchmarks.md). ``none`` makes an image of the file data as it is."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"lib{i}.py").write_text("".join(f"def f{j}(x):\n    return x * {j}\n" for j in range(4000)))
    (src / "noise.bin").write_bytes(os.urandom(MiB))
    sizes = {}
    for kind in ("lz4", "none"):
        monkeypatch.setenv("SNAPBUILD_TREE_IMAGE_COMPRESSION", kind)
        erofs.make(src, tmp_path / f"{kind}.erofs")
        sizes[kind] = (tmp_path / f"{kind}.erofs").stat().st_size
        mnt = tmp_path / f"mnt-{kind}"
        erofs.mount(tmp_path / f"{kind}.erofs", mnt)
        try:
            for f in src.iterdir():
                assert (mnt / f.name).read_bytes() == f.read_bytes(), f"{kind}: {f.name} reads back otherwise"
        finally:
            assert erofs.unmount(mnt)
    assert sizes["lz4"] < sizes["none"] - 512 * 1024, sizes  # the text shrinks, the noise does not
    monkeypatch.setenv("SNAPBUILD_TREE_IMAGE_COMPRESSION", "gzip")
    with pytest.raises(SnapbuildError, match="SNAPBUILD_TREE_IMAGE_COMPRESSION must be one of lz4, none"):
        erofs.make(src, tmp_path / "gzip.erofs")


def test_another_compression_makes_the_image_again(lib_snapshot, store, project, monkeypatch):
    """An image's cache entry says how it was compressed: one made otherwise is not reused."""
    _, _, res = lib_snapshot
    lib = res.steps["lib"].artifact
    entry = store.home / "cache" / "tree-images" / f"{lib.split(':')[1]}.json"
    first = json.loads(entry.read_text())
    assert first["compression"] == "lz4"
    monkeypatch.setenv("SNAPBUILD_TREE_IMAGE_COMPRESSION", "none")
    [again] = build(project / "recipe.yaml", store=store)
    assert again.ok
    second = json.loads(entry.read_text())
    assert second["compression"] == "none" and second["image"] != first["image"]
    config = pull("libcounter:v1", store=store)["config"]
    assert config["tree_images"]["trees"][lib] == second["image"], "the new snapshot names the new image"


def test_build_makes_each_image_once(lib_snapshot, store, recipe, project, run_cli):
    """A second build reuses the image (its cache entry), and the snapshot is the same;
    `inspect` lists the images."""
    _, _, res = lib_snapshot
    r = run_cli("inspect", "libcounter:v1", "--json")
    assert r.code == 0, r
    [listed] = r.json()["tree_images"]
    assert listed["of"] == res.steps["lib"].artifact and listed["kind"] == "tree" and listed["format"] == "erofs"
    cache = store.home / "cache" / "tree-images"
    entries = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert f"{res.steps['lib'].artifact.split(':')[1]}.json" in entries
    subprocess.run(["sync"])
    [again] = build(project / "recipe.yaml", store=store)
    assert again.ok and again.snapshot == res.snapshot
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == entries


def test_an_oci_registry_serves_only_what_a_node_with_images_needs(lib_snapshot, store, oci_registry, tmp_path):
    """The selection over the OCI distribution API: images in, the imaged tree's chunks not."""
    from snapbuild.registry import open_registry, parse_ref
    from snapbuild.registry.transfer import push

    _, _, res = lib_snapshot
    url = f"oci://{oci_registry}/images"
    manifest = json.loads(store.blobs.get(res.snapshot))
    from snapbuild.store.snapshot import referenced_blobs

    push(open_registry(url), parse_ref("libcounter:v1"), res.snapshot, referenced_blobs(manifest), store.blobs)
    node = Store(tmp_path / "node")
    got = pull("libcounter:v1", registry=url, store=node, images=True)
    lib = res.steps["lib"].artifact
    image = got["config"]["tree_images"]["trees"][lib]
    assert got["tree_images"] and got["blobs_fetched"] < got["blobs_total"] - 1
    assert not any(node.blobs.has(d) for d in tree_blobs(load_tree(node.blobs, lib)))
    assert all(node.blobs.has(d) for d in tree_blobs(load_tree(node.blobs, image)))
    assert node.verify().ok


def test_a_restore_killed_at_any_moment_completes_when_run_again(lib_snapshot, store, tmp_path):
    """SIGKILL a node's restore while it fetches, writes the image out or mounts it;
    the next restore completes, from what the first one left."""
    import random
    import time

    port, weights, res = lib_snapshot
    root = Path(os.environ["SNAPBUILD_RUN_ROOT"])
    lib_dir = tree_dir(root, res.steps["lib"].artifact)
    env = {**os.environ, "SNAPBUILD_HOME": str(tmp_path / "node")}
    cmd = [str(Path(sys.executable).parent / "snapbuild-runner"), "restore", "libcounter:v1",
           "--registry", f"file://{store.home / 'registry'}", "--json"]
    rng = random.Random(6)
    for delay in sorted(rng.uniform(0.05, 1.5) for _ in range(4)):
        kill_counter_restore(cmd, env, delay, port)
        time.sleep(0.2)
        restore_after_kill(cmd, env, port, weights, lib_dir, delay)


def restore_after_kill(cmd: list[str], env: dict, port: int, weights: bytes, lib_dir: Path, delay: float,
                       check=lambda: True) -> None:
    """Run the restore ``cmd`` after one was killed ``delay`` seconds in: it restores,
    the server answers with the weights' digest, the tree is mounted from its image (and
    ``check()`` holds); then the node is emptied again (its store keeps what it fetched)."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (delay, done.stdout, done.stderr)
    out = json.loads(done.stdout)
    try:
        assert out["mode"] == "restore", (delay, out)
        assert post(port, "/count")["digest"] == hashlib.sha256(weights).hexdigest()
        assert erofs.is_image_mount(lib_dir) and check(), delay
    finally:
        stop(out["pid"])
    discard(lib_dir)
    assert not lib_dir.exists()


def test_a_tree_whose_mount_went_with_a_reboot_is_mounted_again(lib_snapshot, store, tmp_path):
    port, _, res = lib_snapshot
    from snapbuild.runtime.trees import ensure_tree

    node = Store(tmp_path / "node")
    reg = f"file://{store.home / 'registry'}"
    config = pull("libcounter:v1", registry=reg, store=node, images=True)["config"]
    lib = res.steps["lib"].artifact
    root = Path(os.environ["SNAPBUILD_RUN_ROOT"])
    path, created = ensure_tree(node.blobs, lib, root, config["tree_images"]["trees"][lib])
    assert created and erofs.is_image_mount(path)
    users = path.with_name(path.name + ".users")
    users.write_text(users.read_text() + "/another/store\n")
    subprocess.run(["umount", str(path)], check=True)  # what a reboot does to it
    path, created = ensure_tree(node.blobs, lib, root, config["tree_images"]["trees"][lib])
    assert created and erofs.is_image_mount(path) and (path / "pkg0" / "mod0.py").is_file()
    assert sorted(users.read_text().splitlines()) == sorted([str(node.home), "/another/store"])


def test_what_is_not_a_tree_image_is_never_unmounted_or_emptied(tmp_path):
    """A tmpfs mounted where a tree would be is refused, its files left alone."""
    from snapbuild.errors import SnapbuildError

    path = tmp_path / "run-root" / "trees" / ("a" * 64)
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        (path / "keep.txt").write_text("not ours\n")
        assert erofs.unmount(path) is False
        with pytest.raises(SnapbuildError, match="another file system is mounted there"):
            discard(path)
        assert (path / "keep.txt").read_text() == "not ours\n"
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_direct_pull_leaves_out_only_whole_file_chunks_of_trees_written_out_at_once(store, tmp_path):
    """snapshot.pull_selection with ``direct``: the checkpoint's tree (here ``a``) loses
    the chunks only it holds; packed small files, chunks another tree shares, and every
    tree blob stay (the pull needs them, and the stored packs serve many files)."""
    from snapbuild.store.snapshot import assemble, pull_selection
    from snapbuild.store.tree import build_tree

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "shared.bin").write_bytes(b"s" * (2 * MiB))
    (a / "own.bin").write_bytes(os.urandom(2 * MiB))
    (a / "small.txt").write_text("a small file, packed with others\n")
    ta, _ = build_tree(store.blobs, [(p.name, p) for p in sorted(a.iterdir())])
    tb, _ = build_tree(store.blobs, [(p.name, p) for p in sorted(b.iterdir())])
    digest, _ = assemble(store.blobs, name="x", variant={}, steps=[], outputs={"a": ta, "b": tb})
    manifest = json.loads(store.blobs.get(digest))
    config = {"runtime": {"artifact": ta, "server": {"inputs": {}}}}
    entries = {e["path"]: e for e in load_tree(store.blobs, ta)["entries"]}
    own = {r["digest"] for r in entries["own.bin"]["chunks"]}
    packed = {r["digest"] for r in entries["small.txt"]["chunks"]}
    assert all("offset" in r for r in entries["small.txt"]["chunks"]), "small files are packed"
    chosen = pull_selection(store.blobs, manifest, config, images=False, direct=True)
    assert own and not own & chosen
    assert packed <= chosen and set(tree_blobs(load_tree(store.blobs, tb))) <= chosen and {ta, tb} <= chosen
    assert pull_selection(store.blobs, manifest, config, images=False, direct=False) is None
