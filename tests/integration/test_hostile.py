"""A hostile registry: snapshots and cache entries written by hand, the way someone
with push access would, straight into a file:// registry (and the real OCI registry),
then used the four ways bytes from a registry land on a machine: `snapbuild-runner
pull --dest`, `snapbuild-runner restore`, `snapbuild pull`, and `build --cache-from`.

Every case asserts the exit status and the message, that a sentinel folder outside
is byte for byte unchanged, and that no setuid or setgid file appeared anywhere.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapbuild.registry import open_registry, parse_ref
from snapbuild.registry.transfer import push
from snapbuild.remote_cache import ARTIFACT_TYPE as CACHE_TYPE
from snapbuild.remote_cache import CONFIG_MEDIA_TYPE as CACHE_CONFIG
from snapbuild.remote_cache import REPO as CACHE_REPO
from snapbuild.schema import RUNTIME_FORMAT
from snapbuild.store.blobs import BlobStore
from snapbuild.store.chunks import media_type, put_chunk
from snapbuild.store.fsutil import canonical_json
from snapbuild.store.snapshot import ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE
from snapbuild.store.tree import MEDIA_TYPE as TREE_TYPE

pytestmark = pytest.mark.integration


class Forge:
    """Blobs, trees, configs and manifests of snapshot format v1, made without any of
    snapbuild's checks (docs/format.md is all an attacker needs)."""

    def __init__(self, root: Path) -> None:
        self.blobs = BlobStore(root)

    def file(self, path: str, data: bytes = b"pwned\n", mode: int = 0o644) -> dict:
        return {"path": path, "type": "file", "mode": mode, "size": len(data),
                "chunks": [put_chunk(self.blobs, data)] if data else [],
                "digest": "sha256:" + hashlib.sha256(data).hexdigest()}

    def tree(self, *entries: dict) -> str:
        return self.blobs.put(canonical_json({"mediaType": TREE_TYPE, "entries": list(entries)}))

    def _layers(self, trees: list[str], omit: set[str]) -> list[dict]:
        import json

        layers, chunks = [], {}
        for t in dict.fromkeys(trees):
            layers.append({"mediaType": TREE_TYPE, "digest": t, "size": self.blobs.size(t)})
            for e in json.loads(self.blobs.get(t))["entries"]:
                for ref in e.get("chunks", ()):
                    if ref.get("digest") and ref["digest"] not in omit and self.blobs.has(ref["digest"]):
                        chunks[ref["digest"]] = {"mediaType": media_type(ref), "digest": ref["digest"],
                                                 "size": self.blobs.size(ref["digest"])}
        return layers + list(chunks.values())

    def snapshot(self, outputs: dict[str, str], *, runtime: dict | None = None, tree_images: dict | None = None,
                 extra_trees: tuple[str, ...] = (), omit: set[str] = frozenset()) -> str:
        config = {"format": 1, "name": "evil", "variant": {}, "outputs": outputs, "steps": [], "runtime": runtime,
                  "created_by": "an attacker"}
        if tree_images:
            config["tree_images"] = tree_images
        data = canonical_json(config)
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
                    "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": self.blobs.put(data), "size": len(data)},
                    "layers": self._layers([*outputs.values(), *extra_trees], omit)}
        return self.blobs.put(canonical_json(manifest))

    def cache_entry(self, key: str, artifact: str) -> str:
        entry = canonical_json({"key": key, "name": "app", "kind": "command", "artifact": artifact,
                                "duration_s": 1.0})
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": CACHE_TYPE,
                    "config": {"mediaType": CACHE_CONFIG, "digest": self.blobs.put(entry), "size": len(entry)},
                    "layers": self._layers([artifact], set())}
        return self.blobs.put(canonical_json(manifest))

    def publish(self, url: str, name: str, tag: str, manifest: str) -> None:
        import json

        m = json.loads(self.blobs.get(manifest))
        blobs = [m["config"]["digest"]] + [x["digest"] for x in m["layers"]]
        push(open_registry(url), parse_ref(f"{name}:{tag}"), manifest, blobs, self.blobs)

    def host_runtime(self, app: str, checkpoint: str, **server_fields) -> dict:
        """A runtime section as a real build writes it, for this node's run root."""
        root = os.environ["SNAPBUILD_RUN_ROOT"]
        spec = {"name": "evil", "argv": ["sleep", "600"], "env": {}, "cwd": None, "ready": {"tcp": "127.0.0.1:9"},
                "run_root": root, "run_dir": f"{root}/run/evil-{'0' * 16}", "inputs": {"app": app}, "mounts": {},
                **server_fields}
        return {"format": RUNTIME_FORMAT, "engine": "host", "process": "warm", "server": spec, "pids": [4242],
                "fingerprint": {}, "gpu": None, "after_restore": [], "stats": {}, "step": "ckpt",
                "artifact": checkpoint}


@dataclass
class Case:
    """A crafted snapshot; ``code`` and ``words`` are what every path must answer."""

    make: object  # (forge, sentinel) -> manifest digest
    code: int = 5
    words: str = ""
    paths: tuple = ("runner-pull", "runner-restore", "snapbuild-pull", "cache-from")
    cache_tree: object = None  # (forge, sentinel) -> the tree a forged cache entry names
    env: dict = field(default_factory=dict)


def _plain(f: Forge, tree: str, **kw) -> str:
    return f.snapshot({"app": tree}, **kw)


def _symlink_parent(f, s):
    return f.tree({"path": "a", "type": "symlink", "target": str(s)}, f.file("a/important.txt"))


def _dotdot(f, s):
    return f.tree(f.file("../../" + s.name + "/important.txt"))


def _absolute(f, s):
    return f.tree(f.file(str(s / "important.txt")))


def _duplicate(f, s):
    return f.tree({"path": "a", "type": "dir", "mode": 0o755}, f.file("a"))


def _under_file(f, s):
    return f.tree(f.file("a"), f.file("a/b"))


def _sizes(f, s):
    e = f.file("a", b"x" * 100)
    return f.tree(dict(e, size=99))


def _setuid(f, s):
    return f.tree({"path": "bin", "type": "dir", "mode": 0o3777}, f.file("bin/sh", b"#!/bin/sh\n", 0o6755))


def _app_and_checkpoint(f):
    return f.tree(f.file("app.py", b"print(1)\n")), f.tree(f.file("checkpoint.json", b"{}"))


def _runtime_case(**server_fields):
    def make(f, s):
        app, ckpt = _app_and_checkpoint(f)
        return f.snapshot({"app": app, "ckpt": ckpt}, runtime=f.host_runtime(app, ckpt, **server_fields))
    return make


def _missing_chunk(f, s):
    e = f.file("weights.bin", os.urandom(5000))
    return f.snapshot({"app": f.tree(e)}, omit={e["chunks"][0]["digest"]})


def _image_not_a_tree(f, s):
    e = f.file("big.bin", os.urandom(3000))
    app = f.tree(e)
    return f.snapshot({"app": app}, tree_images={"format": "erofs", "trees": {app: e["chunks"][0]["digest"]}})


def _path_like_output(f, s):
    return f.snapshot({"../../" + s.name: f.tree(f.file("important.txt"))})


CASES = {
    "symlink-parent": Case(lambda f, s: _plain(f, _symlink_parent(f, s)), words="is below 'a'",
                           cache_tree=_symlink_parent),
    "dotdot": Case(lambda f, s: _plain(f, _dotdot(f, s)), words="'..' component", cache_tree=_dotdot),
    "absolute": Case(lambda f, s: _plain(f, _absolute(f, s)), words="is absolute", cache_tree=_absolute),
    "duplicate": Case(lambda f, s: _plain(f, _duplicate(f, s)), words="is a duplicate", cache_tree=_duplicate),
    "under-a-file": Case(lambda f, s: _plain(f, _under_file(f, s)), words="is below 'a', which is not a folder",
                         cache_tree=_under_file),
    "sizes": Case(lambda f, s: _plain(f, _sizes(f, s)), words="has size 99, but its chunks add up to 100",
                  cache_tree=_sizes),
    "missing-chunk": Case(_missing_chunk, words="which the manifest does not list",
                          paths=("runner-pull", "runner-restore", "snapbuild-pull")),
    "path-like-output": Case(_path_like_output, words="must be a plain name",
                             paths=("runner-pull", "runner-restore", "snapbuild-pull")),
    "system-mount": Case(_runtime_case(mounts={"/etc": "app"}), words="would cover a system path",
                         paths=("runner-pull", "runner-restore", "snapbuild-pull")),
    "usr-mount": Case(_runtime_case(mounts={"/usr": "app"}), words="would cover a system path",
                      paths=("runner-restore",)),
    "other-run-root": Case(_runtime_case(run_root="/", run_dir="/run/evil-0000000000000000"),
                           words="is not this node's run root", paths=("runner-pull", "runner-restore",
                                                                       "snapbuild-pull")),
    "run-dir-outside": Case(_runtime_case(run_dir="/etc/evil-0000000000000000"), words="is not",
                            paths=("runner-restore",)),
    "ready-file-outside": Case(_runtime_case(ready={"file": "/etc/passwd"}), words="ready file '/etc/passwd'",
                               paths=("runner-restore", "snapbuild-pull")),
    "image-index-names-a-chunk": Case(_image_not_a_tree, words="tree_images trees must map digests to image trees",
                                      paths=("runner-pull", "runner-restore", "snapbuild-pull")),
}


def _no_setuid_below(root: Path) -> list[str]:
    bad = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                bad.append(os.path.join(dirpath, name))
    return bad


def _tree_of(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, p.read_bytes() if p.is_file() and not p.is_symlink() else None)
    return out


@pytest.fixture
def sentinel(tmp_path):
    s = tmp_path / "sentinel"
    (s / "sub").mkdir(parents=True)
    (s / "important.txt").write_text("keep me\n")
    (s / "sub" / "b").write_text("me too\n")
    return s


@pytest.fixture
def forge(tmp_path):
    return Forge(tmp_path / "forge")


def _run_path(path: str, url: str, run_cli, tmp_path: Path, recipe=None, forge=None, case=None, sentinel=None):
    node = {"SNAPBUILD_HOME": str(tmp_path / f"node-{time.monotonic_ns()}")}
    if path == "runner-pull":
        dest = tmp_path / "dest"
        r = run_cli("pull", "evil:1", "--registry", url, "--dest", dest, tool="snapbuild-runner", env=node)
        assert not dest.exists() or not any(dest.iterdir()), "nothing half-written stays"
        return r
    if path == "runner-restore":
        return run_cli("restore", "evil:1", "--registry", url, tool="snapbuild-runner", env=node)
    if path == "snapbuild-pull":
        r = run_cli("pull", "evil:1", "--registry", url, env=node)
        if r.code != 0:
            ls = run_cli("ls", env=node).out
            assert "evil" not in ls, "a refused snapshot is not tagged in the local registry"
        return r
    assert path == "cache-from"
    path_ = recipe('name: victim\nsteps:\n  app: {kind: command, run: "echo fine > a.txt", outputs: [a.txt]}\n'
                   'publish: {tag: "victim:1"}\n', name="victim.yaml")
    plan = run_cli("plan", path_, "--json", env=node).json()
    key = next(s["key"] for s in plan["steps"] if s["name"] == "app")
    forge.publish(url, CACHE_REPO, key, forge.cache_entry(key, case.cache_tree(forge, sentinel)))
    return run_cli("build", path_, "--cache-from", url, env=node)


PARAMS = [pytest.param(name, path, id=f"{name}-{path}") for name, case in CASES.items() for path in case.paths]


@pytest.mark.parametrize("name, path", PARAMS)
def test_a_hostile_snapshot_is_refused_and_harms_nothing(name, path, forge, sentinel, tmp_path, run_cli, recipe):
    case = CASES[name]
    url = f"file://{tmp_path / 'evil-registry'}"
    if path != "cache-from":
        forge.publish(url, "evil", "1", case.make(forge, sentinel))
    before = _tree_of(sentinel)
    r = _run_path(path, url, run_cli, tmp_path, recipe, forge, case, sentinel)
    assert r.code == case.code, (r.code, r.out, r.err)
    assert case.words in r.err, r.err
    assert "Traceback" not in r.err
    assert _tree_of(sentinel) == before, "the sentinel folder outside is unchanged"
    assert _no_setuid_below(tmp_path) == []


def test_the_refusal_names_the_snapshot_the_step_and_the_entry(forge, sentinel, tmp_path, run_cli):
    url = f"file://{tmp_path / 'evil-registry'}"
    forge.publish(url, "evil", "1", _plain(forge, _symlink_parent(forge, sentinel)))
    r = run_cli("pull", "evil:1", "--registry", url, "--dest", tmp_path / "dest", tool="snapbuild-runner")
    assert r.code == 5
    assert "snapshot evil:1" in r.err and "step 'app'" in r.err and "entry 'a/important.txt'" in r.err, r.err
    assert "TIP" in r.err


def test_setuid_bits_are_dropped_from_what_is_written(forge, sentinel, tmp_path, run_cli):
    """Not refused (a mode is not an attack by itself), but no setuid file appears."""
    url = f"file://{tmp_path / 'evil-registry'}"
    forge.publish(url, "evil", "1", _plain(forge, _setuid(forge, sentinel)))
    dest = tmp_path / "dest"
    r = run_cli("pull", "evil:1", "--registry", url, "--dest", dest, tool="snapbuild-runner")
    assert r.code == 0, r.err
    assert stat.S_IMODE(os.stat(dest / "app/bin/sh").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "app/bin").st_mode) == 0o777
    assert _no_setuid_below(tmp_path) == []


def test_a_snapshot_made_right_by_hand_is_accepted(forge, tmp_path, run_cli):
    """The forge itself makes valid snapshots: the refusals above are the checks'."""
    url = f"file://{tmp_path / 'evil-registry'}"
    t = forge.tree({"path": "d", "type": "dir", "mode": 0o755}, forge.file("d/f", b"hello"),
                   {"path": "d/link", "type": "symlink", "target": "/etc/passwd"})
    forge.publish(url, "evil", "1", _plain(forge, t))
    dest = tmp_path / "dest"
    r = run_cli("pull", "evil:1", "--registry", url, "--dest", dest, tool="snapbuild-runner")
    assert r.code == 0, r.err
    assert (dest / "app/d/f").read_bytes() == b"hello"
    assert os.readlink(dest / "app/d/link") == "/etc/passwd", "a link may point anywhere; it is never followed"


@pytest.mark.parametrize("name", ["symlink-parent", "missing-chunk", "system-mount"])
def test_a_hostile_snapshot_on_the_real_oci_registry_is_refused(name, forge, sentinel, tmp_path, run_cli,
                                                                 oci_registry):
    url = f"oci://{oci_registry}/hostile{time.monotonic_ns()}"
    forge.publish(url, "evil", "1", CASES[name].make(forge, sentinel))
    before = _tree_of(sentinel)
    for path in ("runner-pull", "runner-restore"):
        r = _run_path(path, url, run_cli, tmp_path)
        assert r.code == 5 and CASES[name].words in r.err, (path, r.code, r.err)
    assert _tree_of(sentinel) == before
    assert _no_setuid_below(tmp_path) == []


# -- what only a node that restores meets: tree images and container layers ---------------

def test_a_tree_image_that_is_not_an_erofs_image_is_never_mounted(forge, tmp_path, run_cli, monkeypatch):
    from snapbuild.runtime import erofs

    assert erofs.can_mount(), "EROFS mounts need root and the erofs module (see ENVIRONMENT)"
    app, ckpt = _app_and_checkpoint(forge)
    junk = forge.tree(forge.file(erofs.FILE, os.urandom(8192), 0o444))
    runtime = forge.host_runtime(app, ckpt)
    manifest = forge.snapshot({"app": app, "ckpt": ckpt}, runtime=runtime, extra_trees=(junk,),
                              tree_images={"format": "erofs", "trees": {app: junk}})
    url = f"file://{tmp_path / 'evil-registry'}"
    forge.publish(url, "evil", "1", manifest)
    r = run_cli("restore", "evil:1", "--registry", url, tool="snapbuild-runner",
                env={"SNAPBUILD_TREE_IMAGES": "always", "SNAPBUILD_HOME": str(tmp_path / "node")})
    assert r.code == 5 and "is not an EROFS image: it has no EROFS superblock" in r.err, r.err
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts, "nothing was mounted"


def _layer_tar(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("etc/evil")
        if kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.BLKTYPE, 8, 0
        else:
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/shadow"
        tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("kind, words", [("device", "is a device node"), ("hardlink", "points outside the root")])
def test_a_container_layer_with_a_device_or_an_outside_hardlink_is_refused(kind, words, forge, tmp_path, run_cli):
    """A runc snapshot whose image has a layer making a block device (or a hard link
    to /etc/shadow): the restore refuses the layer, naming it, before any container."""
    import json
    import shutil

    assert shutil.which("runc"), "runc is not installed (ci/setup.sh installs it)"
    data = _layer_tar(kind)
    layer = "sha256:" + hashlib.sha256(data).hexdigest()
    meta = json.dumps({"config": {"config": {}}, "layers": [{"digest": layer, "size": len(data)}]}).encode()
    image = forge.tree(forge.file("image.json", meta), {"path": "layers", "type": "dir", "mode": 0o755},
                       forge.file(f"layers/{layer.split(':')[1]}.tar", data))
    app, ckpt = _app_and_checkpoint(forge)
    runtime = forge.host_runtime(app, ckpt, image=image, image_step="image", engine_options={}, image_config={})
    runtime["engine"] = "runc"
    forge.publish(f"file://{tmp_path / 'evil-registry'}", "evil", "1",
                  forge.snapshot({"app": app, "ckpt": ckpt, "image": image}, runtime=runtime))
    r = run_cli("restore", "evil:1", "--registry", f"file://{tmp_path / 'evil-registry'}", tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(tmp_path / "node")})
    assert r.code == 5 and words in r.err and layer in r.err, (r.code, r.err)
    assert not os.path.exists("/etc/evil")
