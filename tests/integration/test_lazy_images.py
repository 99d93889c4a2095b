"""Tree images fetched as they are read (runtime.lazyimage, runtime.lazyfs): the real
FUSE (libfuse3 through mfusepy), loop devices, the kernel's EROFS, and, end to end,
the real OCI registry and CRIU. The registry is stood in for by a fetch function
where a test must hold some chunks back to see a read wait for its own."""

from __future__ import annotations

import errno
import hashlib
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

from snapbuild.errors import SnapbuildError
from snapbuild.runtime import erofs, layout, lazyimage
from snapbuild.runtime.trees import discard, ensure_tree
from snapbuild.store.blobs import BlobStore
from snapbuild.store.direct import Direct
from snapbuild.store.tree import build_tree, load_tree, tree_blobs

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _can_lazy() -> str | None:
    if os.geteuid() != 0:
        return "mounting needs root"
    if not erofs.can_mount() or shutil.which("mkfs.erofs") is None:
        return "no EROFS here"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A tree of small files and two big ones, as an EROFS image stored as a one-file
    tree: (source folder, source store, image tree digest). ``a.bin`` fills the chunks
    the background fetchers take first; ``z.bin`` lies beyond them."""
    why = _can_lazy()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("lazy")
    src = base / "src"
    rng = random.Random(7)
    for i in range(300):
        (src / f"pkg{i % 10}").mkdir(parents=True, exist_ok=True)
        (src / f"pkg{i % 10}" / f"mod{i}.py").write_text(f"VALUE = {i}\n" * 20)
    (src / "a.bin").write_bytes(rng.randbytes(24 * MiB))  # random: lz4 keeps it as big
    (src / "z.bin").write_bytes(rng.randbytes(9 * MiB))
    erofs.make(src, base / "tree.erofs")
    blobs = BlobStore(base / "blobs")
    digest = build_tree(blobs, [(erofs.FILE, base / "tree.erofs")])[0]
    assert len(load_tree(blobs, digest)["entries"][0]["chunks"]) >= 8, "the test needs an image of many chunks"
    return src, blobs, digest


class Registry:
    """The registry, stood in for: fetches ``source``'s blobs and remembers which;
    ``fail`` names blobs whose fetch fails."""

    def __init__(self, source: BlobStore) -> None:
        self.source = source
        self.fail: set[str] = set()
        self.fetched: list[str] = []

    def __call__(self, digest: str) -> bytes:
        self.fetched.append(digest)
        if digest in self.fail:
            raise OSError("connection reset by peer")
        return self.source.get(digest)


def node(tmp_path, source: BlobStore, gate: Registry, digest: str) -> tuple[Direct, Path]:
    """An empty node's store reading through ``gate``, lazy images asked for, and the
    folder the image goes to."""
    empty = BlobStore(tmp_path / "node-blobs")
    direct = Direct(empty, gate)
    direct.lazy_images = True
    root = tmp_path / "run"
    folder = layout.tree_dir(root, digest)
    return direct, folder


def loop_backing(folder: Path) -> str:
    """The file behind the loop device mounted at ``folder``."""
    dev = next(line.split()[0] for line in Path("/proc/self/mounts").read_text().splitlines()
               if line.split()[1] == str(folder))
    return Path(f"/sys/block/{Path(dev).name}/loop/backing_file").read_text().strip()


def test_a_read_waits_only_for_its_own_chunk_and_the_image_ends_as_a_plain_mount(image, tmp_path):
    src, source, digest = image
    gate = Registry(source)
    direct, folder = node(tmp_path, source, gate, digest)
    refs = load_tree(source, digest)["entries"][0]["chunks"]
    erofs.mount_tree(direct, digest, folder)
    try:
        assert erofs.is_image_mount(folder), "mounted before the image is here"
        assert not layout.image_file(folder).exists(), "the image file appears only complete"
        assert lazyimage.complete(folder), "this process fetches it: usable meanwhile"
        # Until the restore asks for the rest, only what reads wait for is fetched.
        assert (folder / "z.bin").read_bytes() == (src / "z.bin").read_bytes()
        assert (folder / "pkg3" / "mod13.py").read_text() == "VALUE = 13\n" * 20
        asked = set(gate.fetched) - {digest}
        assert 3 <= len(asked) < len(refs) - 3, "z.bin's chunks (and the metadata's), not a.bin's"
        done = lazyimage.finish(direct)
        assert done["images"] == 1 and done["chunks_asked"] >= 3, done
        assert set(gate.fetched) >= {r["digest"] for r in refs if "digest" in r}
        image_file = layout.image_file(folder)
        assert image_file.is_file() and not layout.image_partial(image_file).exists()
        assert image_file.read_bytes() == (src.parent / "tree.erofs").read_bytes()
        assert loop_backing(folder) == str(image_file), "the loop device reads the complete file now"
        lazy = layout.lazy_mount_dir(folder)
        assert not os.path.ismount(lazy) and not lazy.exists(), "the FUSE file system is gone"
        subprocess.run(["sync"])
        Path("/proc/sys/vm/drop_caches").write_text("3")
        assert (folder / "a.bin").read_bytes() == (src / "a.bin").read_bytes(), "read from the file, not FUSE"
        assert not _lazyfs_processes(), "its process ended"
    finally:
        lazyimage.abort(direct)
        erofs.take_down(folder)
    assert not os.path.ismount(folder)


def _lazyfs_processes() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"snapbuild.runtime.lazyfs" in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def test_a_chunk_that_cannot_be_fetched_fails_its_reads_and_leaves_nothing_half_written(image, tmp_path):
    src, source, digest = image
    gate = Registry(source)
    direct, folder = node(tmp_path, source, gate, digest)
    root = folder.parent.parent
    refs = load_tree(source, digest)["entries"][0]["chunks"]
    gate.fail.add(refs[-1]["digest"])  # the last chunk: the registry breaks
    assert ensure_tree(direct, digest, root, image=digest) == (folder, True)
    with pytest.raises(OSError) as e:  # an error, never bytes that are not the file's
        (folder / "z.bin").read_bytes()
    assert e.value.errno == errno.EIO
    with pytest.raises(SnapbuildError, match="connection reset by peer"):
        lazyimage.finish(direct)
    image_file = layout.image_file(folder)
    assert not image_file.exists() and not layout.image_partial(image_file).exists()
    assert not lazyimage.complete(folder), "the mount left behind counts as absent"
    assert not os.path.ismount(layout.lazy_mount_dir(folder)) and not _lazyfs_processes()
    # The next try, with the registry back, makes it again and completes.
    gate.fail.clear()
    assert ensure_tree(direct, digest, root, image=digest) == (folder, True)
    try:
        assert lazyimage.finish(direct)["images"] == 1
        assert (folder / "z.bin").read_bytes() == (src / "z.bin").read_bytes()
        assert ensure_tree(direct, digest, root, image=digest) == (folder, False)
    finally:
        discard(folder)


def test_a_node_whose_fuse_cannot_start_writes_the_image_out_whole(image, tmp_path, monkeypatch, caplog):
    src, source, digest = image
    gate = Registry(source)
    direct, folder = node(tmp_path, source, gate, digest)
    monkeypatch.setattr(lazyimage.sys, "executable", "/bin/false")  # the FUSE process dies at once
    erofs.mount_tree(direct, digest, folder)
    try:
        assert "not fetched as it is read" in caplog.text and "did not start" in caplog.text
        assert layout.image_file(folder).is_file() and not direct.lazy_started
        assert loop_backing(folder) == str(layout.image_file(folder))
        assert (folder / "z.bin").read_bytes() == (src / "z.bin").read_bytes()
        assert not os.path.ismount(layout.lazy_mount_dir(folder))
    finally:
        erofs.take_down(folder)


def test_a_hostile_image_is_refused_before_the_kernel_sees_it(image, tmp_path):
    _, source, _ = image
    blobs = BlobStore(tmp_path / "hostile")
    bad = tmp_path / "bad.erofs"
    bad.write_bytes(os.urandom(10 * MiB))  # no EROFS superblock
    digest = build_tree(blobs, [(erofs.FILE, bad)])[0]
    direct, folder = node(tmp_path, blobs, Registry(blobs), digest)
    from snapbuild.errors import IntegrityError

    with pytest.raises(IntegrityError, match="not an EROFS image"):
        erofs.mount_tree(direct, digest, folder)
    assert not os.path.ismount(folder) and not _lazyfs_processes()
    assert not list(layout.image_files(folder.parent.parent).glob("*"))


KILLED = """
import sys, threading
from pathlib import Path
sys.path.insert(0, {tests!r})
from snapbuild.runtime.trees import ensure_tree
from snapbuild.store.blobs import BlobStore
from snapbuild.store.direct import Direct
source = BlobStore(Path({source!r}))
direct = Direct(BlobStore(Path({empty!r})), source.get)
direct.lazy_images = True
ensure_tree(direct, {digest!r}, Path({root!r}), image={digest!r})
print("mounted", flush=True)
threading.Event().wait()  # only what reads ask for is fetched until the restore asks for the rest
"""


def test_a_runner_killed_mid_fetch_leaves_a_mount_the_next_one_makes_again(image, tmp_path):
    """The process fetching an image dies (SIGKILL): its FUSE process goes with it, the
    mount left behind counts as absent, and the next restore mounts the image again."""
    src, source, digest = image
    root = tmp_path / "run"
    code = KILLED.format(tests=str(Path(__file__).parent), source=str(source.root), empty=str(tmp_path / "e"),
                         digest=digest, root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "mounted"
    folder = layout.tree_dir(root, digest)
    assert os.path.ismount(folder)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _lazyfs_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _lazyfs_processes(), "the FUSE process ends with the process it served"
    assert not lazyimage.complete(folder), "nobody fetches it, and its image file never came"
    direct = Direct(BlobStore(tmp_path / "e2"), Registry(source))
    direct.lazy_images = True
    path, created = ensure_tree(direct, digest, root, image=digest)
    try:
        assert created and lazyimage.finish(direct)["images"] == 1
        assert (path / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
        assert ensure_tree(direct, digest, root, image=digest) == (path, False), "complete now"
    finally:
        discard(path)


# --- end to end: the real OCI registry and CRIU ------------------------------------------

@pytest.fixture
def published(recipe, project, store, oci_registry):
    """The counter server mapping a 24 MiB file of a 300-file input tree (so that tree
    gets an image of several chunks), pushed to the real registry; the trees the build
    wrote out on this machine deleted, as on an empty node."""
    if _can_lazy():
        pytest.skip(_can_lazy())
    from snapbuild.build import build
    from snapbuild.registry import open_registry, parse_ref
    from snapbuild.registry.transfer import push
    from snapbuild.store.snapshot import referenced_blobs
    from test_tree_images import lib_recipe
    from testkit import free_port

    port = free_port()
    path, _ = lib_recipe(recipe, project, port)
    weights = random.Random(5).randbytes(24 * MiB)
    (path.parent / "lib" / "w.bin").write_bytes(weights)
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    url = f"oci://{oci_registry}/lazy{time.monotonic_ns()}"
    manifest = json.loads(store.blobs.get(res.snapshot))
    push(open_registry(url), parse_ref("libcounter:v1"), res.snapshot, referenced_blobs(manifest), store.blobs)
    root = Path(os.environ["SNAPBUILD_RUN_ROOT"])
    for step in ("app", "lib"):
        discard(layout.tree_dir(root, res.steps[step].artifact))
    return url, port, weights, layout.tree_dir(root, res.steps["lib"].artifact)


def test_an_empty_node_restores_with_its_tree_image_fetched_as_read(published, tmp_path, monkeypatch):
    from snapbuild.runner.restore import run, stop
    from snapbuild.store import Store
    from testkit import post

    monkeypatch.setenv("SNAPBUILD_TREE_IMAGES", "always")  # about fetching, not trust (test_tree_images)
    url, port, weights, lib_dir = published
    node = Store(tmp_path / "node")
    out = run("libcounter:v1", registry=url, store=node, fallback="fail", lazy_images=True)
    try:
        assert out["mode"] == "restore" and out["tree_images"] == "used", out
        assert out["lazy_images"]["images"] == 1 and out["lazy_images"]["chunks"] >= 6, out
        assert "images_s" in out["timings"]
        assert post(port, "/count")["digest"] == hashlib.sha256(weights).hexdigest()
        image_file = layout.image_file(lib_dir)
        assert loop_backing(lib_dir) == str(image_file) and image_file.is_file()
        image = load_tree(node.blobs, out_image(node, out, lib_dir))
        assert not any(node.blobs.has(d) for d in tree_blobs(image)), "straight from the registry, not stored"
        assert node.verify().ok
        assert not _lazyfs_processes() and not os.path.ismount(layout.lazy_mount_dir(lib_dir))
    finally:
        stop(out["pid"])
    discard(lib_dir)
    # Off (the default): the image is written out whole first.
    monkeypatch.delenv("SNAPBUILD_LAZY_IMAGES", raising=False)
    out = run("libcounter:v1", registry=url, store=Store(tmp_path / "node2"), fallback="fail")
    try:
        assert out["mode"] == "restore" and out["lazy_images"] is None and "images_s" not in out["timings"]
    finally:
        stop(out["pid"])
    discard(lib_dir)


def out_image(node, out: dict, lib_dir: Path) -> str:
    """The digest of the image tree of the tree at ``lib_dir``, from the snapshot's config."""
    from snapbuild.store.snapshot import load_config

    config = load_config(node.blobs, json.loads(node.blobs.get(out["digest"])))
    return next(v for k, v in config["tree_images"]["trees"].items() if k.split(":")[1] == lib_dir.name)


def test_the_runner_cli_takes_lazy_images_and_says_what_it_did(published, tmp_path):
    from snapbuild.runner.restore import stop
    from testkit import post

    url, port, weights, lib_dir = published
    env = {**os.environ, "SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_TREE_IMAGES": "always"}
    runner = str(Path(sys.executable).parent / "snapbuild-runner")
    done = subprocess.run([runner, "restore", "libcounter:v1", "--registry", url, "--lazy-images", "on", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    try:
        assert out["mode"] == "restore" and out["lazy_images"]["images"] == 1, out
        assert post(port, "/count")["digest"] == hashlib.sha256(weights).hexdigest()
    finally:
        stop(out["pid"])
    discard(lib_dir)
    bad = subprocess.run([runner, "restore", "libcounter:v1", "--registry", url],
                         env={**env, "SNAPBUILD_LAZY_IMAGES": "maybe"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "SNAPBUILD_LAZY_IMAGES must be on or off" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_restore_killed_at_any_moment_completes_when_run_again(published, tmp_path):
    """SIGKILL a node's restore while it fetches, mounts, restores or completes an image
    fetched as read; the next restore completes, with the image whole under its mount."""
    from test_tree_images import restore_after_kill
    from testkit import kill_counter_restore

    url, port, weights, lib_dir = published
    env = {**os.environ, "SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_TREE_IMAGES": "always",
           "SNAPBUILD_LAZY_IMAGES": "on"}
    cmd = [str(Path(sys.executable).parent / "snapbuild-runner"), "restore", "libcounter:v1", "--registry", url,
           "--json"]
    rng = random.Random(11)
    for delay in sorted(rng.uniform(0.1, 2.0) for _ in range(3)):
        kill_counter_restore(cmd, env, delay, port)
        deadline = time.monotonic() + 10
        while _lazyfs_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _lazyfs_processes(), delay
        restore_after_kill(cmd, env, port, weights, lib_dir, delay,
                           check=lambda: loop_backing(lib_dir) == str(layout.image_file(lib_dir)))


def test_a_layer_whose_image_failed_to_arrive_is_mounted_again_not_taken_as_unpacked(image, tmp_path):
    """A container layer mounted from an image fetched as read: when a chunk fails, the
    layer's marker stays, and the next use must mount the image again rather than take
    the folder for a layer unpacked there (empty, or reading nothing)."""
    from snapbuild.rootfs import cached_layer, forget_layer

    src, source, digest = image
    gate = Registry(source)
    direct, _ = node(tmp_path, source, gate, digest)
    cache = tmp_path / "run" / "layers"
    refs = load_tree(source, digest)["entries"][0]["chunks"]
    gate.fail.add(refs[-1]["digest"])

    def mount_image(dest):
        erofs.mount_tree(direct, digest, dest)

    def never_unpacked():
        raise AssertionError("a layer with an image is mounted, never unpacked")

    layer = cached_layer(digest, never_unpacked, cache, user="node", mount_image=mount_image)
    with pytest.raises(SnapbuildError):
        lazyimage.finish(direct)
    gate.fail.clear()
    again = cached_layer(digest, never_unpacked, cache, user="node", mount_image=mount_image)
    try:
        assert again == layer and lazyimage.finish(direct)["images"] == 1, "mounted again"
        assert (again / "z.bin").read_bytes() == (src / "z.bin").read_bytes()
    finally:
        forget_layer(again)
