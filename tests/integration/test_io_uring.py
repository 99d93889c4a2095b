"""io_uring, as the container world handles it: a real uvloop 0.23 server (libuv 1.52,
which opens an io_uring for every loop) warms up, checkpoints and restores as a host
process (plain and in namespaces of its own) and in a runc container, because
warm-ups and cold boots start with io_uring denied by seccomp; restored, it keeps the
filter and its loop works. With the opt-out (``io_uring: allow``) the build fails at
the scan right after the server is ready, naming the process and the fd, before any
exercise or dump. And a dump that fails late keeps its CRIU log where the tip says.

uvloop comes from PyPI through the recipe's own pip step (cached by its key).
"""

from __future__ import annotations

import json
import os
import re
import socket
import textwrap
import threading
import urllib.request
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import process, seccomp
from snapbuild.store import Store

from testkit import free_port  # tests/integration/testkit.py

pytestmark = pytest.mark.integration

UVLOOP = "uvloop==0.23.0"
# The server: asyncio streams on uvloop's loop. /infer counts (warm state), sleeps on a
# libuv timer and says how many io_uring descriptors the process holds.
SERVER = r'''
import asyncio, json, os, sys
import uvloop

COUNT = 0


def io_urings():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]"
        except OSError:
            pass
    return n


async def handle(reader, writer):
    global COUNT
    head = await reader.readuntil(b"\r\n\r\n")
    method, path, _ = head.split(b"\r\n")[0].decode().split(" ", 2)
    for h in head.split(b"\r\n")[1:]:
        if h.lower().startswith(b"content-length:") and int(h.split(b":")[1]):
            await reader.readexactly(int(h.split(b":")[1]))
    body = {"ok": True}
    if path == "/infer":
        COUNT += 1
        await asyncio.sleep(0.01)
        body = {"count": COUNT, "io_uring": io_urings(), "loop": type(asyncio.get_running_loop()).__module__}
    data = json.dumps(body).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    await writer.drain()
    writer.close()


async def main(port):
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


uvloop.run(main(int(sys.argv[1])))
'''


def ask(port: int) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/infer", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def io_uring_fds(pid: int) -> list[str]:
    return [f"{p}: {path}" for p in process.tree(pid) for path, t in process.fds(p) if t == "anon_inode:[io_uring]"]


def host_recipe(project: Path, port: int, *, io_uring: str = "deny", checkpoint: str = "",
                exercise: str = '{http: "POST /infer", body: "{}", repeat: 3}') -> Path:
    (project / "app").mkdir(exist_ok=True)
    (project / "app" / "uv_server.py").write_text(SERVER)
    (project / "recipe.yaml").write_text(f"""\
name: uvloop-server
steps:
  pydeps:
    kind: command
    run: "python3 -m pip install --quiet --no-compile --target site {UVLOOP}"
    pass_env: ["PIP_*"]
    outputs: [site/]
  app: {{kind: files, root: app}}
  server:
    kind: warmup
    needs: [pydeps, app]
    command: [python3, "$SNAPBUILD_INPUTS/app/uv_server.py", "{port}"]
    env: {{PYTHONPATH: "$SNAPBUILD_INPUTS/pydeps/site", PYTHONDONTWRITEBYTECODE: "1"}}
    ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 120}}
    exercise: [{exercise}]
    io_uring: {io_uring}
  snap: {{kind: checkpoint, process: server{checkpoint}}}
publish: {{tag: "uvloop-server:v1"}}
""")
    return project / "recipe.yaml"


@pytest.mark.parametrize("isolation", ["host", "namespaces"])
def test_a_uvloop_server_checkpoints_and_restores_with_io_uring_denied(isolation, project, store, tmp_path):
    port = free_port()
    ckpt = ", isolation: namespaces" if isolation == "namespaces" else ""
    [res] = build(host_recipe(project, port, checkpoint=ckpt), store=store)
    assert res.ok, {n: (r.error, r.hint, r.log_tail) for n, r in res.steps.items()}

    node, reg = Store(tmp_path / "node"), f"file://{store.home / 'registry'}"
    publish = "0" if isolation == "namespaces" else None
    for mode in ("restore", "cold"):
        out = run("uvloop-server:v1", registry=reg, store=node, fallback="fail", mode=mode, publish=publish)
        try:
            assert out["mode"] == mode, out
            at = int(out["address"].rsplit(":", 1)[1]) if publish else port
            answer = ask(at)
            # restored: the warm-up's three calls are in its memory; cold: a new process
            assert answer == {"count": 4 if mode == "restore" else 1, "io_uring": 0, "loop": "uvloop"}, answer
            assert io_uring_fds(out["pid"]) == [], "no process of the tree holds an io_uring"
            assert {seccomp.mode(p) for p in process.tree(out["pid"])} == {2}, \
                "every process of the tree runs under the filter (CRIU restored it, or the cold boot loaded it)"
        finally:
            stop(out["pid"])
            process.wait_gone(process.tree(out["pid"]), timeout=10)


def test_with_the_opt_out_the_build_fails_at_the_scan_naming_process_and_fd(project, store, tmp_path):
    port = free_port()
    touched = tmp_path / "exercised"
    recipe = host_recipe(project, port, io_uring="allow", exercise=f'{{run: "touch {touched}"}}')
    [res] = build(recipe, store=store)
    snap = res.steps["snap"]
    assert not res.ok and snap.error, res.steps
    m = re.search(r"process (\d+) \((.*?)\) holds an io_uring instance on fd (\d+) \(anon_inode:\[io_uring\]\)",
                  snap.error)
    assert m, snap.error
    assert "uv_server.py" in m.group(2), "the command line names the server"
    assert "io_uring: allow" in snap.hint, snap.hint
    assert not touched.exists(), "refused right after ready: before the exercises, long before a dump"
    assert "dumped" not in (store.log_path(snap.key).read_text())


def test_a_unix_socket_to_a_process_outside_the_tree_is_named_before_the_dump(project, store, tmp_path):
    """The peer here is this test process, which holds the accepted end."""
    path = f"/tmp/sb-peer-{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    port = free_port()
    try:
        recipe = host_recipe(project, port)
        app = project / "app" / "uv_server.py"
        app.write_text(f"import socket\n_peer = socket.socket(socket.AF_UNIX)\n_peer.connect({path!r})\n"
                       + app.read_text())
        [res] = build(recipe, store=store)
        error = res.steps["snap"].error or ""
        assert re.search(r"process \d+ \(.*uv_server\.py.*\) holds a unix socket connected to a process outside its "
                         rf"tree \(pid {os.getpid()}: .*\) on fd \d+ \(socket:\[\d+\]\)", error), error
    finally:
        for s in [*accepted, listener]:
            s.close()
        os.unlink(path)


def test_a_dump_that_fails_keeps_its_log_where_the_tip_says(project, store):
    """An AF_VSOCK socket: nothing the scan knows, so CRIU itself fails, late."""
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except (OSError, AttributeError):
        pytest.skip("no AF_VSOCK sockets on this kernel")
    port = free_port()
    recipe = host_recipe(project, port)
    app = project / "app" / "uv_server.py"
    app.write_text("import socket\n_v = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n" + app.read_text())
    [res] = build(recipe, store=store)
    snap = res.steps["snap"]
    assert not res.ok and "criu dump" in (snap.error or ""), snap.error
    logs = re.findall(r"full log: (\S+?)\)?$", snap.hint or "", re.M)
    assert logs, snap.hint
    kept = Path(logs[0])
    assert kept.is_file() and "Dumping FAILED" in kept.read_text(), kept


def container_recipe(project: Path, rootfs: Path, port: int) -> Path:
    (project / "app").mkdir(exist_ok=True)
    (project / "app" / "uv_server.py").write_text(SERVER)
    (project / "recipe.yaml").write_text(textwrap.dedent(f"""\
        name: uvloop-runc
        steps:
          pydeps:
            kind: command
            run: "python3 -m pip install --quiet --no-compile --target site {UVLOOP}"
            pass_env: ["PIP_*"]
            outputs: [site/]
          base: {{kind: image, from: "rootfs:{rootfs}"}}
          app: {{kind: image, from: base, copy: {{"app/uv_server.py": /app/uv_server.py}}}}
          server:
            kind: warmup
            image: app
            mounts: {{/deps: pydeps}}
            command: [python3, /app/uv_server.py, "{port}"]
            env: {{PYTHONPATH: /deps/site, PYTHONDONTWRITEBYTECODE: "1"}}
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 120}}
            exercise: [{{http: "POST /infer", body: "{{}}", repeat: 3}}]
          snap: {{kind: checkpoint, process: server, engine: runc}}
        publish: {{tag: "uvloop-runc:v1"}}
        """))
    return project / "recipe.yaml"


def test_a_uvloop_server_in_a_runc_container_checkpoints_and_restores(base_rootfs, dockerd, project, store,
                                                                      tmp_path):
    [res] = build(container_recipe(project, base_rootfs, free_port()), store=store)
    assert res.ok, {n: (r.error, r.hint, r.log_tail) for n, r in res.steps.items()}
    node, reg = Store(tmp_path / "node"), f"file://{store.home / 'registry'}"
    for mode in ("restore", "cold"):
        out = run("uvloop-runc:v1", registry=reg, store=node, fallback="fail", mode=mode, publish="0")
        try:
            assert out["mode"] == mode, out
            answer = ask(int(out["address"].rsplit(":", 1)[1]))
            assert answer == {"count": 4 if mode == "restore" else 1, "io_uring": 0, "loop": "uvloop"}, answer
            assert io_uring_fds(out["pid"]) == []
            assert {seccomp.mode(p) for p in process.tree(out["pid"])} == {2}, "runc's filter, kept by CRIU"
        finally:
            stop(out["container"])

