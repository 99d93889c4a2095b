"""Side-by-side restores of one host-process snapshot (`isolation: namespaces`), with the
real CRIU: the warm-up runs the server in PID, network and IPC namespaces of its own, so
every restore gets its own PIDs and port, reached through a published host port.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop

from test_criu_snapshots import counter_recipe, no_server_left
from testkit import free_port, port_free, post

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


def isolated_counter(recipe, store, port: int):
    path = counter_recipe(recipe, port)
    path.write_text(path.read_text().replace("snap: {kind: checkpoint, process: server}",
                                             "snap: {kind: checkpoint, process: server, isolation: namespaces}"))
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    assert port_free(port), "the warm-up's port was its namespace's: nothing of it on the host"
    return path


def test_three_restores_of_one_snapshot_side_by_side(recipe, store, run_cli):
    port = free_port()
    isolated_counter(recipe, store, port)
    # three at once, as an agent starting replicas would
    procs = [subprocess.Popen([str(BIN / "snapbuild-runner"), "restore", "counter:v1", "--publish", "0", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout))
    try:
        assert [o["mode"] for o in outs] == ["restore"] * 3, [o["reason"] for o in outs]
        ports = [int(o["address"].rsplit(":", 1)[1]) for o in outs]
        assert len(set(ports)) == 3 and port not in ports
        first = [post(p, "/count") for p in ports]
        assert [a["count"] for a in first] == [3, 3, 3], "each replica has the warm state, its own copy"
        assert len({a["pid"] for a in first}) == 1, "the same PID, each in its own namespace"
        assert post(ports[0], "/count")["count"] == 4 and post(ports[1], "/count")["count"] == 4
        assert len({o["pid"] for o in outs}) == 3, "three processes on the host"

        for i, o in enumerate(outs):  # stopped one by one; the others keep answering
            r = run_cli("stop", str(o["pid"]), tool="snapbuild-runner")
            assert r.code == 0, r
            deadline = time.monotonic() + 10
            while not port_free(ports[i]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert port_free(ports[i]), "its forwarder went with it"
            for j in range(i + 1, 3):
                assert post(ports[j], "/count")["count"] >= 4
    finally:
        for o in outs:
            stop(o["pid"])
    assert no_server_left("counter_server.py") and no_server_left("portfwd --fd")


def test_the_default_port_is_taken_by_the_first_and_cold_boots_run_side_by_side(recipe, store, run_cli):
    port = free_port()
    isolated_counter(recipe, store, port)
    first = run("counter:v1", store=store)  # published on the server's own port number
    try:
        assert first["mode"] == "restore" and first["address"] == f"127.0.0.1:{port}"
        assert post(port, "/count")["count"] == 3
        r = run_cli("restore", "counter:v1", tool="snapbuild-runner")
        assert r.code == 2 and f"host port {port} is already taken" in r.err and "--publish" in r.err, r
        colds = [run("counter:v1", store=store, mode="cold", publish="0") for _ in range(2)]
        try:
            for c in colds:
                assert c["mode"] == "cold" and c["address"] != first["address"]
                assert post(int(c["address"].rsplit(":", 1)[1]), "/count")["count"] == 1, "cold: no warm state"
            assert post(port, "/count")["count"] == 4
        finally:
            for c in colds:
                stop(c["pid"])
    finally:
        stop(first["pid"])
    assert no_server_left("counter_server.py")


def test_without_isolation_publish_is_refused_with_the_way_out(recipe, store, run_cli):
    port = free_port()
    build(counter_recipe(recipe, port), store=store)
    r = run_cli("restore", "counter:v1", "--publish", "0", tool="snapbuild-runner")
    assert r.code == 2 and "this host process listens on the port it was built with" in r.err, r
    assert "isolation: namespaces" in r.err


def test_a_server_with_dev_shm_files_is_refused_in_namespaces(recipe, store):
    port = free_port()
    path = recipe(f"""
        name: shm
        steps:
          server:
            kind: warmup
            run: "python3 -c 'import http.server as h, os; f = open(\\"/dev/shm/sb-replica-{port}\\", \\"w\\"); h.HTTPServer((\\"127.0.0.1\\", {port}), h.SimpleHTTPRequestHandler).serve_forever()'"
            ready: {{http: "http://127.0.0.1:{port}/", timeout: 30}}
          snap: {{kind: checkpoint, process: server, isolation: namespaces}}
    """)
    try:
        [res] = build(path, store=store)
        assert not res.ok
        assert "isolation: namespaces: the server holds files in /dev/shm" in res.steps["snap"].error
    finally:
        subprocess.run(["rm", "-f", f"/dev/shm/sb-replica-{port}"])
    assert no_server_left(f"sb-replica-{port}")


def test_an_unexpected_error_after_the_restore_leaves_no_server_or_forwarder(recipe, store, monkeypatch):
    """Anything but a reason to boot cold (here a bug, as a RuntimeError in the step
    after CRIU's restore; Ctrl-C takes the same path) propagates, and the restored
    server and its port forwarder are stopped first."""
    from snapbuild.runner import restore

    port = free_port()
    isolated_counter(recipe, store, port)

    def broken(*args, **kwargs):
        raise RuntimeError("injected after the restore")

    monkeypatch.setattr(restore, "_after_restore", broken)
    published = free_port()
    with pytest.raises(RuntimeError, match="injected"):
        run("counter:v1", store=store, publish=str(published))
    assert no_server_left("counter_server.py") and no_server_left("portfwd --fd"), "nothing left running"
    assert port_free(published)
