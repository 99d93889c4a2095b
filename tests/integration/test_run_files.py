"""What a host server holds in its run folder and in /dev/shm travels with its
checkpoint, against the real CRIU.

The server below does at start-up what vLLM does: it writes a "kernel" into
``$SNAPBUILD_RUN/cache/`` and keeps it mapped, with its file closed (as ``dlopen`` does
with torch.compile's ``.so`` files), keeps an index file open, holds a scratch file it
deleted, and maps a 256 MiB /dev/shm file that holds a few pages of data (vLLM's
``psm_*`` ring buffers: 400 MiB that hold 92 KiB). A node restores it with no run folder
of the build's (removed here; a clean store), and gets the same answers, with the run
root on a disk and on tmpfs.
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
from snapbuild.runtime import process
from snapbuild.schema import Runtime
from snapbuild.store import Store
from snapbuild.store.chunks import read_file
from snapbuild.store.tree import load_tree

from test_containers import counter_container  # tests/integration/
from testkit import free_port, get, port_free, post  # tests/integration/testkit.py
from tests.conftest import _unmount_below

pytestmark = pytest.mark.integration

SHM_SIZE = 256 << 20
PAGES = (0, 100, 65535)  # the pages of the /dev/shm file that hold data

SERVER = r'''
import ctypes, hashlib, http.server, json, mmap, os, sys

port, shm_path = int(sys.argv[1]), sys.argv[2]
cache = os.path.join(os.environ["SNAPBUILD_RUN"], "cache")
os.makedirs(os.path.join(cache, "kernels"), exist_ok=True)

kernel = os.path.join(cache, "kernels", "k.main.so")
data = hashlib.sha256(b"kernel").digest() * 4096  # 128 KiB
with open(kernel, "wb") as f:
    f.write(data)
os.chmod(kernel, 0o755)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                          ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(kernel, os.O_RDONLY)
addr = libc.mmap(None, len(data), 1, 2, fd, 0)  # PROT_READ, MAP_PRIVATE: mapped, as dlopen does
os.close(fd)  # and no longer open

index = os.path.join(cache, "index.json")
with open(index, "w") as f:
    json.dump({"kernel": "kernels/k.main.so"}, f)
index_file = open(index, "rb")

scratch = os.path.join(cache, "scratch.tmp")
with open(scratch, "wb") as f:
    f.write(b"scratch!" * 512)
scratch_file = open(scratch, "rb")
os.unlink(scratch)  # held after it was deleted: CRIU carries it itself (a ghost file)

shm_fd = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(shm_fd, @SIZE@)
shm = mmap.mmap(shm_fd, @SIZE@)
for page in @PAGES@:
    shm[page * 4096:page * 4096 + 8] = b"page%04d" % (page % 10000)

count = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, body):
        raw = json.dumps(body, sort_keys=True).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        if self.path == "/healthz":
            return self.answer({"ok": True})
        self.answer({"kernel": hashlib.sha256(ctypes.string_at(addr, len(data))).hexdigest(),
                     "index": os.pread(index_file.fileno(), 100, 0).decode(),
                     "scratch": os.pread(scratch_file.fileno(), 8, 4088).decode(),
                     "shm": [shm[p * 4096:p * 4096 + 8].decode() for p in @PAGES@]})

    def do_POST(self):
        global count
        count += 1
        self.answer({"count": count})

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''.replace("@SIZE@", str(SHM_SIZE)).replace("@PAGES@", repr(PAGES))


def recipe_for(recipe, port: int, shm: Path) -> Path:
    path = recipe(f"""
        name: runfiles
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            command: ["{sys.executable}", "$SNAPBUILD_INPUTS/app/server.py", "{port}", "{shm}"]
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
            exercise: [{{http: "POST /count", repeat: 2}}]
          snap: {{kind: checkpoint, process: server, verify: [{{http: "GET /state"}}]}}
        publish: {{tag: "runfiles:v1"}}
    """)
    (path.parent / "app").mkdir(exist_ok=True)
    (path.parent / "app" / "server.py").write_text(SERVER)
    return path


def checkpoint_json(store: Store, artifact: str) -> dict:
    entry = next(e for e in load_tree(store.blobs, artifact)["entries"] if e["path"] == "checkpoint.json")
    return json.loads(read_file(store.blobs, entry))


@pytest.fixture(params=["disk", "tmpfs"])
def run_root_on(request, monkeypatch):
    """The run root on the test's disk (conftest's), or on tmpfs."""
    if request.param == "disk":
        yield request.param
        return
    root = Path(f"/dev/shm/snapbuild-test-runroot-{os.getpid()}-{free_port()}")
    monkeypatch.setenv("SNAPBUILD_RUN_ROOT", str(root))
    yield request.param
    _unmount_below(root)  # the input trees, shown read-only (conftest does it for tmp_path only)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def shm_file():
    path = Path(f"/dev/shm/snapbuild-test-runfiles-{os.getpid()}-{free_port()}")
    yield path
    path.unlink(missing_ok=True)


def test_files_held_in_the_run_folder_and_a_sparse_shm_file_restore_on_a_node_without_them(
        recipe, store, tmp_path, shm_file, run_root_on):
    port = free_port()
    [res] = build(recipe_for(recipe, port, shm_file), store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    assert port_free(port)
    ckpt = Runtime.from_json(checkpoint_json(store, res.steps["snap"].artifact))
    paths = {f["path"]: f for f in ckpt.run_files}
    assert ckpt.format == 5
    assert {"cache/kernels/k.main.so", "cache/index.json"} <= set(paths), paths
    assert paths["cache/kernels/k.main.so"]["mode"] == 0o755 and paths["cache/kernels/k.main.so"]["size"] == 131072
    assert not any("scratch" in p for p in paths), "a deleted file is CRIU's to carry (a ghost file)"
    assert "server.log" not in paths, "the runner's own log is never carried"
    [shm_rec] = [f for f in ckpt.shm_files if f["name"] == shm_file.name]
    assert shm_rec["size"] == SHM_SIZE

    run_dir = Path(ckpt.server.run_dir)
    shutil.rmtree(run_dir)  # a node that never ran the warm-up: no run folder, a new store
    node = Store(tmp_path / "node")
    out = run("runfiles:v1", registry=f"file://{store.home / 'registry'}", store=node, fallback="fail",
              lazy_pages=False)
    try:
        assert out["mode"] == "restore" and out["verify"] == "same", out
        state = json.loads(get(port, "/state"))
        assert state["shm"] == [f"page{p % 10000:04d}" for p in PAGES]
        assert state["scratch"] == "scratch!" and json.loads(state["index"]) == {"kernel": "kernels/k.main.so"}
        assert post(port, "/count")["count"] == 3, "the warm counter came back"
        st = shm_file.stat()
        assert st.st_size == SHM_SIZE
        assert st.st_blocks * 512 < 1 << 20, f"the /dev/shm file is written back sparse: {st.st_blocks * 512} bytes"
        assert (run_dir / "cache" / "kernels" / "k.main.so").stat().st_mode & 0o777 == 0o755
    finally:
        stop(out["pid"])
        process.wait_gone(process.tree(out["pid"]), timeout=10)


def test_a_runc_containers_run_folder_files_restore_into_a_new_instance(
        base_rootfs, dockerd, recipe, project, store, tmp_path):
    """The same server in a runc container: its run folder is the instance's own (made
    empty for each start or restore), so the kernel it maps came back only because the
    checkpoint carried it (CRIU: "Can't open file ... on restore" otherwise, as vLLM's
    compile cache did)."""
    port = free_port()
    (project / "app").mkdir(exist_ok=True)
    (project / "app" / "server.py").write_text(SERVER)
    path = counter_container(recipe, project, base_rootfs, "runfiles-runc", port,
                             command=f'[python3, /app/server.py, "{port}", /dev/shm/rings]',
                             checkpoint=', verify: [{http: "GET /state"}]')
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    ckpt = Runtime.from_json(checkpoint_json(store, res.steps["snap"].artifact))
    paths = {f["path"] for f in ckpt.run_files}
    assert ckpt.format == 5 and {"cache/kernels/k.main.so", "cache/index.json"} <= paths, paths
    assert "server.log" not in paths and not any("scratch" in p for p in paths)
    node = Store(tmp_path / "node")
    out = run("runfiles-runc:v1", registry=f"file://{store.home / 'registry'}", store=node, fallback="fail",
              publish="0")
    host_port = int(out["address"].rsplit(":", 1)[1])
    try:
        assert out["mode"] == "restore" and out["verify"] == "same", out
        state = json.loads(get(host_port, "/state"))
        assert state["shm"] == [f"page{p % 10000:04d}" for p in PAGES] and state["scratch"] == "scratch!"
        assert post(host_port, "/count")["count"] == 3, "the warm counter came back"
    finally:
        stop(out["container"])
