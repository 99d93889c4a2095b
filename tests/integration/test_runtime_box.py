"""A snapshot's runtime section stays in its box, with the real CLI, CRIU and runc:

- hostile runtime sections (forged by hand, as someone with push access would) whose
  mount points lie below system folders or the run root, or whose `after_restore`
  calls go elsewhere than the restored server, are refused before anything is
  mounted or asked (a real HTTP server on 127.0.0.1 stands for "elsewhere");
- a container's `after_restore` run lines run inside the container (`runc exec`);
- the mounts the runner makes for a host server go when no server of the node uses
  them any more: on `snapbuild-runner stop` of the last one, and on `gc` once the
  server died without a stop.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import mounts, process

from test_containers import counter_container, leftovers  # tests/integration/
from test_hostile import Forge, _app_and_checkpoint
from testkit import free_port, port_free, post, weights_counter_recipe

pytestmark = pytest.mark.integration


@pytest.fixture
def elsewhere():
    """A real HTTP server on 127.0.0.1 that counts what reaches it: where a hostile
    snapshot's calls would go."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], hits
    srv.shutdown()
    srv.server_close()


def _publish(tmp_path: Path, runtime_fields: dict | None = None, **server_fields) -> str:
    forge = Forge(tmp_path / "forge")
    app, ckpt = _app_and_checkpoint(forge)
    runtime = forge.host_runtime(app, ckpt, **server_fields)
    runtime.update(runtime_fields or {})
    url = f"file://{tmp_path / 'evil-registry'}"
    forge.publish(url, "evil", "1", forge.snapshot({"app": app, "ckpt": ckpt}, runtime=runtime))
    return url


@pytest.mark.parametrize("dest, words", [
    ("/etc/cron.d-x", "is below the system folder /etc"),
    ("/usr/local/x", "is below the system folder /usr"),
    ("/root/.ssh-x", "is below the system folder /root"),
    ("/var/lib/x-snapbuild-test", "is below the system folder /var/lib"),
    ("/lib64x/y", "is below the system folder /lib64x"),
])
def test_a_mount_below_a_system_folder_is_refused(dest, words, tmp_path, run_cli):
    url = _publish(tmp_path, mounts={dest: "app"})
    for tool_args in (("pull", "evil:1"), ("restore", "evil:1")):
        r = run_cli(*tool_args, "--registry", url, tool="snapbuild-runner",
                    env={"SNAPBUILD_HOME": str(tmp_path / "node")})
        assert r.code == 5 and words in r.err and "SNAPBUILD_ALLOW_MOUNT_ROOTS" in r.err, (r.code, r.err)
        assert "Traceback" not in r.err
    assert not os.path.exists(dest), "nothing was made there"


def test_a_mount_inside_the_run_root_is_refused(tmp_path, run_cli):
    dest = f"{os.environ['SNAPBUILD_RUN_ROOT']}/trees"
    url = _publish(tmp_path, mounts={dest: "app"})
    r = run_cli("restore", "evil:1", "--registry", url, tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(tmp_path / "node")})
    assert r.code == 5 and "where snapbuild keeps its files" in r.err, (r.code, r.err)


def test_a_node_that_allows_a_root_mounts_below_it(tmp_path, run_cli):
    """Allowed: the snapshot passes the check (and fails later, for want of a real
    checkpoint: the forge's is junk), so the refusal above is the rule's."""
    url = _publish(tmp_path, mounts={"/usr/local/x": "app"})
    r = run_cli("pull", "evil:1", "--registry", url, tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_ALLOW_MOUNT_ROOTS": "/opt:/usr/local"})
    assert r.code == 0, r.err


def test_a_node_that_allows_a_root_in_its_settings_file_mounts_below_it(tmp_path, run_cli):
    """The same, with allow_mount_roots in node.toml instead of the variable."""
    url = _publish(tmp_path, mounts={"/usr/local/x": "app"})
    node = tmp_path / "node.toml"
    node.write_text('allow_mount_roots = ["/opt", "/usr/local"]\n')
    r = run_cli("--config", node, "pull", "evil:1", "--registry", url, tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(tmp_path / "node")})
    assert r.code == 0, r.err


@pytest.mark.parametrize("where, ready, target, words", [
    ("after_restore", {"http": "http://127.0.0.1:9/healthz"}, "http://127.0.0.1:{port}/latest/meta-data",
     "is not the restored server"),
    ("after_restore", {"log": "ready"}, "/x", "its ready probe (a log or file probe) names none"),
    ("verify", {"log": "ready"}, "/x", "its ready probe (a log or file probe) names none"),
])
def test_a_call_after_the_restore_goes_to_the_restored_server_only(where, ready, target, words, elsewhere, tmp_path,
                                                                   run_cli):
    """A URL of another server, or a path with no server address to ask it on (it would
    go to 127.0.0.1:80): refused before anything is asked."""
    port, hits = elsewhere
    item = {"http": f"GET {target.format(port=port)}", "headers": {}}
    if where == "verify":
        item["answer"] = {"status": 200, "bytes": 0, "sha256": "0" * 64, "head": ""}
    url = _publish(tmp_path, {where: [item]}, ready=ready)
    r = run_cli("restore", "evil:1", "--registry", url, tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(tmp_path / "node")})
    assert r.code == 5 and f"{where}[0].http" in r.err and words in r.err, (r.code, r.err)
    assert hits == [], "nothing reached the other server"


def test_a_container_runs_its_after_restore_lines_inside_itself(base_rootfs, dockerd, recipe, project, store):
    port = free_port()
    marker = f"/tmp/snapbuild-after-restore-{os.getpid()}-{time.monotonic_ns()}"
    # /snapbuild/run is the container's run folder; the hostname is the container's own.
    line = f"cat /proc/sys/kernel/hostname > /snapbuild/run/where && touch {marker}"
    path = counter_container(recipe, project, base_rootfs, "boxed", port, checkpoint=(
        f', after_restore: [{{run: "{line}"}}, {{http: "POST http://127.0.0.1:{port}/count"}}]'))
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    published = free_port()
    out = run("boxed:v1", store=store, fallback="fail", publish=str(published))
    try:
        assert out["mode"] == "restore" and "after_restore_s" in out["timings"], out
        assert (Path(out["log"]).parent / "where").read_text().strip() == "snapbuild", "ran in the container"
        assert not os.path.exists(marker), "nothing ran on this machine"
        assert post(published, "/count")["count"] == 4, ("2 warm-up calls, after_restore's (sent to the "
                                                         "published port, not the one it names), then this one")
    finally:
        stop(out["container"])
    assert leftovers("sb-boxed") == []


def _mounted_replicas(recipe, store, point: Path) -> None:
    path, _ = weights_counter_recipe(recipe, free_port(), name="mapped", data="model", mount=point)
    path.write_text(path.read_text().replace("snap: {kind: checkpoint, process: server}",
                                             "snap: {kind: checkpoint, process: server, isolation: namespaces}"))
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    assert not mounts.is_mount_point(point), "the build takes its mount away"


def test_a_mount_goes_when_the_last_server_using_it_stops(recipe, store, mount_point, run_cli):
    _mounted_replicas(recipe, store, mount_point)
    outs = []
    try:
        for _ in range(2):  # two replicas, side by side, reading the same mount
            r = run_cli("restore", "mapped:v1", "--publish", "0", "--json", tool="snapbuild-runner")
            assert r.code == 0, r.err
            outs.append(r.json())
        assert [o["mode"] for o in outs] == ["restore", "restore"], [o["reason"] for o in outs]
        assert mounts.is_mount_point(mount_point)
        assert run_cli("stop", str(outs[0]["pid"]), tool="snapbuild-runner").code == 0
        assert mounts.is_mount_point(mount_point), "the other replica still uses it"
        port = int(outs[1]["address"].rsplit(":", 1)[1])
        assert post(port, "/count")["count"] == 3
        assert run_cli("stop", str(outs[1]["pid"]), tool="snapbuild-runner").code == 0
        assert not mounts.is_mount_point(mount_point), "no server uses it any more"
        assert port_free(port)
    finally:
        for o in outs:
            stop(o["pid"])


def test_gc_takes_away_the_mount_of_a_server_that_died(recipe, store, mount_point, run_cli):
    _mounted_replicas(recipe, store, mount_point)
    r = run_cli("restore", "mapped:v1", "--publish", "0", "--json", tool="snapbuild-runner")
    assert r.code == 0, r.err
    out = r.json()
    try:
        assert run_cli("gc", tool="snapbuild-runner").code == 0
        assert mounts.is_mount_point(mount_point), "its server runs: gc leaves the mount"
        os.kill(out["pid"], signal.SIGKILL)  # died without a stop
        process.wait_gone([out["pid"]], timeout=10)
        assert mounts.is_mount_point(mount_point)
        assert run_cli("gc", tool="snapbuild-runner").code == 0
        assert not mounts.is_mount_point(mount_point), "no server uses it: gc unmounted it"
    finally:
        stop(out["pid"])
