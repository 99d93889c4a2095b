"""The node agent (`snapbuild-runner serve`) against the real runner, CRIU and restored
servers on this machine: restore, crash and restart, crash loops, tags that move,
SIGTERM, SIGKILL and adoption, the API and its metrics.

The agent runs as a subprocess, as on a node; the snapshots are counter servers built
by the tests into the local registry of a fresh $SNAPBUILD_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from snapbuild.build import build

from testkit import free_port, port_free, post

pytestmark = pytest.mark.integration

COUNTER = Path(__file__).parent / "data" / "counter_server.py"
BIN = Path(sys.executable).parent


def counter(recipe, store, port: int, tag: str = "counter:prod", calls: int = 2, isolation: str = "host") -> str:
    """Build a counter snapshot (warmed with ``calls`` requests) published as ``tag``."""
    path = recipe(f"""
        name: counter
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            run: "{sys.executable} $SNAPBUILD_INPUTS/app/counter_server.py --port {port}"
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
            exercise: [{{http: "POST /count", repeat: {calls}}}]
          snap: {{kind: checkpoint, process: server, isolation: {isolation}}}
        publish: {{tag: "{tag}"}}
    """, name=f"counter-{calls}-{isolation}.yaml")
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(COUNTER, path.parent / "app" / "counter_server.py")
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    return res.snapshot


class AgentProc:
    def __init__(self, config: Path, api_port: int, log: Path, env: dict | None = None) -> None:
        self.api, self.log_path = f"http://127.0.0.1:{api_port}", log
        self.proc = subprocess.Popen([str(BIN / "snapbuild-runner"), "serve", "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.api + path, timeout=5) as r:
            return r.read().decode()

    def server(self, name: str = "counter") -> dict:
        return next(s for s in json.loads(self.get("/servers"))["servers"] if s["name"] == name)

    def wait(self, pred, timeout: float = 60, what: str = "", name: str = "counter") -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the agent exited: {self.log_path.read_text()[-2000:]}"
            try:
                last = self.server(name)
                if pred(last):
                    return last
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {last}\n{self.log_path.read_text()[-2000:]}")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def agent(tmp_path, home):
    """agent(servers_toml, poll_s=...) starts `snapbuild-runner serve`; stopped after the test."""
    started = []

    def _start(servers: str, poll_s: float = 30, state_dir: Path | None = None, env: dict | None = None) -> AgentProc:
        port = free_port()
        config = tmp_path / f"agent-{len(started)}.toml"
        config.write_text(f'poll_s = {poll_s}\napi = "127.0.0.1:{port}"\n'
                          f'state_dir = "{state_dir or tmp_path / "agent-state"}"\n\n{servers}')
        a = AgentProc(config, port, tmp_path / "agent.log", env)
        started.append(a)
        return a

    yield _start
    for a in started:
        if a.proc.poll() is None:
            a.stop()


def metric(text: str, name: str, **labels) -> float | None:
    """A sample's value from Prometheus text (parsed by prometheus_client, as a scraper would)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_the_agent_restores_serves_its_api_and_stops_everything_on_sigterm(agent, recipe, store):
    port = free_port()
    digest = counter(recipe, store, port)
    a = agent('[[server]]\nname = "counter"\nref = "counter:prod"\n')
    s = a.wait(lambda s: s["state"] == "ready", what="ready")
    assert s["mode"] == "restore" and s["digest"] == digest and s["restarts"] == 0
    assert post(port, "/count")["count"] == 3, "the warm state came back"
    metrics = a.get("/metrics")
    assert metric(metrics, "snapbuild_server_starts_total", server="counter", mode="restore") == 1
    assert metric(metrics, "snapbuild_time_to_ready_seconds_count", mode="restore", phase="restore") == 1
    assert metric(metrics, "snapbuild_server_up", server="counter") == 1
    assert metric(metrics, "snapbuild_node_cache_bytes") > 0
    assert metric(metrics, "snapbuild_blob_lookups_total", result="cached") > 0, "built here: every blob local"
    assert "request:" in a.get("/servers/counter/log?lines=20"), "the server's own output, through the agent"
    assert a.get("/healthz")
    assert a.stop() == 0
    assert not alive(s["pid"]), "SIGTERM stops the servers the agent started"
    events = [e["event"] for e in a.events()]
    assert events[0] == "warning", "no trust policy here: the agent says snapshots are not verified, first"
    assert events.count("warning") == 1
    assert events[1:3] == ["started", "serving"] or events[1:3] == ["serving", "started"]
    assert "stopped" in events


def test_a_server_that_dies_is_restored_again_and_a_crash_loop_ends_failed(agent, recipe, store):
    port = free_port()
    counter(recipe, store, port)
    a = agent('[[server]]\nname = "counter"\nref = "counter:prod"\nmax_restarts = 3\nrestart_window_s = 120\n'
              'backoff_s = 0.2\nbackoff_max_s = 0.5\n')
    s = a.wait(lambda s: s["state"] == "ready", what="ready")
    os.kill(s["pid"], signal.SIGKILL)
    s = a.wait(lambda s: s["state"] == "ready" and s["restarts"] == 1, what="restart")
    assert s["mode"] == "restore" and post(port, "/count")["count"] == 3, "restored warm again"
    for n in (2, 3):
        os.kill(s["pid"], signal.SIGKILL)
        if n < 3:
            s = a.wait(lambda s, n=n: s["state"] == "ready" and s["restarts"] == n, what=f"restart {n}")
    s = a.wait(lambda s: s["state"] == "failed", what="failed")
    assert "died 3 times within 120 s" in s["last_error"] and s["pid"] is None
    time.sleep(1.5)
    assert a.server()["state"] == "failed" and a.server()["restarts"] == 3, "no restart once failed"
    assert metric(a.get("/metrics"), "snapbuild_server_crashes_total", server="counter") == 3


def retag(store, name: str, digest: str, tag: str) -> None:
    """Point ``name:tag`` at ``digest`` in the local registry (what a CI push does)."""
    from snapbuild.registry import default_registry_url, open_registry

    reg = open_registry(default_registry_url(store.home))
    reg.put_manifest(name, digest, reg.get_manifest(name, digest), tag)


def test_a_moved_tag_is_rolled_to(agent, recipe, store):
    port = free_port()
    second = counter(recipe, store, port, tag="counter:v2", calls=5)  # built first: a build needs the port
    first = counter(recipe, store, port)
    a = agent('[[server]]\nname = "counter"\nref = "counter:prod"\n', poll_s=0.5)
    a.wait(lambda s: s["state"] == "ready" and s["digest"] == first, what="v1")
    retag(store, "counter", second, "prod")
    s = a.wait(lambda s: s["state"] == "ready" and s["digest"] == second, what="the roll")
    assert s["mode"] == "restore" and post(port, "/count")["count"] == 6, "the new version's warm state"
    assert [e["new"] for e in a.events() if e["event"] == "roll"] == [second]
    assert metric(a.get("/metrics"), "snapbuild_rolls_total", server="counter", result="ok") == 1


def test_a_failed_server_gets_a_new_chance_when_its_tag_moves(agent, recipe, store):
    port = free_port()
    second = counter(recipe, store, port, tag="counter:v2", calls=5)
    counter(recipe, store, port)
    a = agent('[[server]]\nname = "counter"\nref = "counter:prod"\nmax_restarts = 1\n', poll_s=0.5)
    s = a.wait(lambda s: s["state"] == "ready", what="ready")
    os.kill(s["pid"], signal.SIGKILL)
    a.wait(lambda s: s["state"] == "failed", what="failed")
    retag(store, "counter", second, "prod")
    s = a.wait(lambda s: s["state"] == "ready" and s["digest"] == second, what="the new version")
    assert post(port, "/count")["count"] == 6


def test_an_agent_killed_with_sigkill_adopts_its_servers_on_restart(agent, recipe, store, tmp_path):
    port = free_port()
    counter(recipe, store, port)
    state = tmp_path / "state"
    a = agent('[[server]]\nname = "counter"\nref = "counter:prod"\n', state_dir=state)
    s = a.wait(lambda s: s["state"] == "ready", what="ready")
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    assert alive(s["pid"]) and post(port, "/count")["count"] == 3, "the server outlives the agent"
    b = agent('[[server]]\nname = "counter"\nref = "counter:prod"\n', state_dir=state)
    s2 = b.wait(lambda s: s["state"] == "ready", what="adopted")
    assert s2["pid"] == s["pid"] and s2["restarts"] == 0 and post(port, "/count")["count"] == 4, \
        "the same server, not a second one"
    assert [e["event"] for e in b.events() if e["event"] in ("adopted", "started")][-1] == "adopted"
    # this test's servers only (their run root is under tmp_path): not another test's
    out = subprocess.run(["pgrep", "-f", f"{tmp_path}.*counter_server.py"], capture_output=True,
                         text=True).stdout.split()
    assert len(out) == 1, f"one server, no double: {out}"
    assert b.stop() == 0 and not alive(s["pid"])


def test_bad_configurations_are_refused_with_the_place_and_a_hint(tmp_path):
    from snapbuild.errors import UsageError
    from snapbuild.runner.agent import load_config

    cases = [('[[server]]\nname = "a"\n', "`name` and `ref` are required"),
             ('[[server]]\nname = "a"\nref = "a:b"\nport = 1\n', "unknown key(s) port"),
             ('[[server]]\nname = "a"\nref = "a:b"\n[[server]]\nname = "a"\nref = "c:d"\n', "a second server named"),
             ('poll_s = 5\n', "declares no [[server]]"),
             ('[[server\n', "is not valid TOML"),
             ('poll_s = "soon"\n[[server]]\nname = "a"\nref = "a:b"\n', "`poll_s` must be an integer or a number"),
             ('[[server]]\nname = "a"\nref = "a:b"\npublish = "80"\n', "number 1: `publish` must be an integer"),
             ('server = 3\n', "`server` must be a list"),
             ('[[server]]\nname = "a"\nref = "a:b"\ncold_after = true\n', "`cold_after` must be an integer"),
             ('[[server]]\nname = "a"\nref = "a:b"\nlazy_pages = "yes"\n', "`lazy_pages` must be true or false")]
    for text, message in cases:
        path = tmp_path / "agent.toml"
        path.write_text(text)
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_config(path)
    path.write_text('registry = "file:///r"\n[[server]]\nname = "a"\nref = "a:b"\n')
    assert load_config(path).servers[0].registry == "file:///r", "top-level defaults reach every server"
    path.write_text('[[server]]\nname = "a"\nref = "a:b"\nlazy_pages = false\n')
    assert load_config(path).servers[0].lazy_pages is False


def test_a_removed_key_in_an_old_configuration_is_ignored_with_a_warning(tmp_path, caplog):
    from snapbuild.runner.agent import load_config

    path = tmp_path / "agent.toml"
    path.write_text('[[server]]\nname = "a"\nref = "a:b"\nlazy_images = true\n')
    with caplog.at_level("WARNING", logger="snapbuild.runner.agent.config"):
        assert load_config(path).servers[0].name == "a"
    assert "number 1: lazy_images is ignored: tree images fetched as they are read were removed" in caplog.text


def container_counter(recipe, store, rootfs: Path, tag: str, calls: int) -> str:
    path = recipe(f"""
        name: ccounter
        steps:
          base: {{kind: image, from: "rootfs:{rootfs}"}}
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            image: base
            needs: [app]
            command: [python3, "$SNAPBUILD_INPUTS/app/counter_server.py", --port, "8080"]
            ready: {{http: "http://127.0.0.1:8080/healthz", timeout: 60}}
            exercise: [{{http: "POST /count", repeat: {calls}}}]
          snap: {{kind: checkpoint, process: server, engine: runc}}
        publish: {{tag: "{tag}"}}
    """, name=f"ccounter-{calls}.yaml")
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(COUNTER, path.parent / "app" / "counter_server.py")
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    return res.snapshot


def roll_without_downtime(a, port: int, move_tag, new: str) -> dict:
    """Move the tag while a client probes the node port in a loop: it never sees the
    port closed. Returns the slot, rolled to ``new``."""
    import threading

    failures, probes, stop = [], [0], threading.Event()

    def probe():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    r.read()
                probes[0] += 1
            except OSError as e:
                failures.append(repr(e))
            time.sleep(0.01)

    t = threading.Thread(target=probe)
    t.start()
    try:
        move_tag()
        s = a.wait(lambda s: s["state"] == "ready" and s["digest"] == new, what="the roll", timeout=120)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert failures == [] and probes[0] > 20, (failures[:5], probes)
    return s


def test_a_host_process_in_namespaces_rolls_beside_its_successor(agent, recipe, store):
    """isolation: namespaces: the new version restores beside the old one (its own PIDs
    and port), so the node port never closes, as with a container."""
    port, node_port = free_port(), free_port()
    second = counter(recipe, store, port, tag="counter:v2", calls=5, isolation="namespaces")
    first = counter(recipe, store, port, isolation="namespaces")
    a = agent(f'[[server]]\nname = "counter"\nref = "counter:prod"\npublish = {node_port}\n', poll_s=0.5)
    s = a.wait(lambda s: s["state"] == "ready", what="ready")
    assert s["digest"] == first and s["mode"] == "restore" and s["address"] and not s["container"], s
    assert post(node_port, "/count")["count"] == 3 and port_free(port), "only the node port, on the host"
    old_pid = s["pid"]
    s = roll_without_downtime(a, node_port, lambda: retag(store, "counter", second, "prod"), second)
    assert s["mode"] == "restore" and post(node_port, "/count")["count"] == 6
    assert not alive(old_pid), "the old version stopped once the new one was serving"
    assert a.stop() == 0 and not alive(s["pid"])


def test_a_container_rolls_with_a_ready_server_at_every_moment(agent, recipe, store, base_rootfs):
    """The agent serves the node port itself and switches it to the new version once
    that is ready: a client probing in a loop never sees the port closed."""
    second = container_counter(recipe, store, base_rootfs, "ccounter:v2", 5)
    first = container_counter(recipe, store, base_rootfs, "ccounter:prod", 2)
    port = free_port()
    a = agent(f'[[server]]\nname = "counter"\nref = "ccounter:prod"\npublish = {port}\n', poll_s=0.5)
    s = a.wait(lambda s: s["state"] == "ready", what="ready", timeout=120)
    assert s["digest"] == first and s["container"] and post(port, "/count")["count"] == 3
    s = roll_without_downtime(a, port, lambda: retag(store, "ccounter", second, "prod"), second)
    assert post(port, "/count")["count"] == 6, "the new version answers on the same port"
    running = subprocess.run(["runc", "list", "-q"], capture_output=True, text=True).stdout.split()
    assert [c for c in running if c.startswith("sb-ccounter")] == [s["container"]], "the old one is gone"
    assert a.stop() == 0
    assert [c for c in subprocess.run(["runc", "list", "-q"], capture_output=True, text=True).stdout.split()
            if c.startswith("sb-ccounter")] == [], "SIGTERM removes the container"


def test_a_registry_outage_leaves_the_running_version_serving(agent, recipe, store, tmp_path):
    from conftest import _serve_registry

    from snapbuild.registry import default_registry_url, open_registry, parse_ref
    from snapbuild.registry.transfer import copy

    port = free_port()
    second = counter(recipe, store, port, tag="counter:v2", calls=5)
    first = counter(recipe, store, port)
    (tmp_path / "reg").mkdir()
    proc, host = _serve_registry(tmp_path / "reg")
    url = f"oci://{host}/team"
    local = open_registry(default_registry_url(store.home))
    for tag in ("prod", "v2"):
        copy(local, parse_ref(f"counter:{tag}"), open_registry(url), parse_ref(f"counter:{tag}"), store.blobs)
    # The agent's node has a store of its own: it pulls from the registry.
    a = agent(f'registry = "{url}"\n[[server]]\nname = "counter"\nref = "counter:prod"\n', poll_s=1,
              env={"SNAPBUILD_HOME": str(tmp_path / "node")})
    try:
        s = a.wait(lambda s: s["state"] == "ready", what="ready")
        assert s["digest"] == first
        proc.terminate()
        proc.wait()
        deadline = time.monotonic() + 60
        while not any(e["event"] == "poll_failed" for e in a.events()):
            assert time.monotonic() < deadline, a.log_path.read_text()[-2000:]
            time.sleep(0.2)
        s = a.server()
        assert s["state"] == "ready" and s["digest"] == first and post(port, "/count")["count"] == 3
        proc = subprocess.Popen([shutil.which("docker-registry"), "serve", str(tmp_path / "reg" / "config.yml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # back, same port and data
        deadline = time.monotonic() + 30
        while True:
            try:
                open_registry(url).resolve(parse_ref("counter:v2"))
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        reg = open_registry(url)
        reg.put_manifest("counter", second, reg.get_manifest("counter", second), "prod")
        s = a.wait(lambda s: s["state"] == "ready" and s["digest"] == second, what="the roll after the outage")
        assert post(port, "/count")["count"] == 6
    finally:
        proc.terminate()


def test_flags_instead_of_a_file_and_the_api_on_a_unix_socket(recipe, store, tmp_path):
    import http.client
    import socket as sk

    port = free_port()
    counter(recipe, store, port)
    sock = tmp_path / "agent.sock"
    log = tmp_path / "agent.log"
    proc = subprocess.Popen([str(BIN / "snapbuild-runner"), "serve", "--server", "counter=counter:prod",
                             "--api", f"unix:{sock}", "--state-dir", str(tmp_path / "state")],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = sk.socket(sk.AF_UNIX)
            self.sock.connect(str(sock))

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = UnixConnection("agent")
                c.request("GET", "/servers")
                servers = json.loads(c.getresponse().read())["servers"]
                if servers[0]["state"] == "ready":
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        assert servers[0]["mode"] == "restore" and post(port, "/count")["count"] == 3
        assert oct(sock.stat().st_mode & 0o777) == "0o660", "only root and its group talk to the agent"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    r = subprocess.run([str(BIN / "snapbuild-runner"), "serve"], capture_output=True, text=True)
    assert r.returncode == 2 and "needs --config FILE or --server NAME=REF" in r.stderr


def test_fallback_reasons_become_a_few_label_values_and_flags_parse():
    from snapbuild.errors import UsageError
    from snapbuild.runner.agent import config_from_flags, reason_kind

    assert reason_kind("fingerprint mismatch: this CPU lacks features the checkpoint may use: avx512f") == \
        "fingerprint"
    assert reason_kind("restore failed: criu restore failed (exit 1)") == "restore_failed"
    assert reason_kind("the GPU state did not come back: CUDA restore of pid 7 failed") == "gpu"
    assert reason_kind("host engine unusable here: criu is not installed") == "engine"
    assert reason_kind("something new") == "other"
    cfg = config_from_flags(["web=app:prod:8080", "emb=minilm@sha256:" + "ab" * 32], registry="file:///r")
    assert [(s.name, s.ref, s.publish, s.registry) for s in cfg.servers] == [
        ("web", "app:prod", 8080, "file:///r"), ("emb", "minilm@sha256:" + "ab" * 32, None, "file:///r")]
    with pytest.raises(UsageError, match="expected NAME=REF"):
        config_from_flags(["nameless"])


def test_the_proxy_switches_new_connections_and_lets_open_ones_finish():
    import socket as sk
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from snapbuild.runner.agent import Proxy

    def backend(answer: bytes):
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *a):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd

    old, new = backend(b"old"), backend(b"new")
    port = free_port()
    proxy = Proxy(port)
    try:
        get = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()  # noqa: E731
        with pytest.raises(OSError):
            get()  # no backend yet: the connection is closed at once
        proxy.backend = ("127.0.0.1", old.server_address[1])
        assert get() == b"old"
        held = sk.create_connection(("127.0.0.1", port))  # a connection open across the switch
        time.sleep(0.1)
        proxy.backend = ("127.0.0.1", new.server_address[1])
        assert get() == b"new"
        held.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := held.recv(1024):  # HTTP/1.0: the server closes after its answer
            answer += chunk
        assert answer.endswith(b"old"), "an open connection stays with the old version"
        held.close()
        proxy.drain(("127.0.0.1", old.server_address[1]), timeout=5)
        assert proxy.active[("127.0.0.1", old.server_address[1])] == 0
    finally:
        proxy.close()
        old.shutdown()
        new.shutdown()


def test_after_repeated_failed_restores_the_agent_boots_cold_directly(agent, recipe, store, tmp_path):
    """A node where restoring cannot work (here: its CRIU is broken) still serves:
    each start falls back, and after `cold_after` of those the agent stops trying."""
    port = free_port()
    counter(recipe, store, port)
    broken = tmp_path / "criu"
    broken.write_text("#!/bin/sh\necho 'criu: broken on this node' >&2\nexit 1\n")
    broken.chmod(0o755)
    a = agent('[[server]]\nname = "counter"\nref = "counter:prod"\ncold_after = 2\nbackoff_s = 0.2\n',
              env={"SNAPBUILD_CRIU": str(broken)})
    s = a.wait(lambda s: s["state"] == "ready", what="ready")
    assert s["mode"] == "cold" and "unusable" in s["reason"] and s["restore_failures"] == 1
    for n in (1, 2):
        os.kill(s["pid"], signal.SIGKILL)
        s = a.wait(lambda s, n=n: s["state"] == "ready" and s["restarts"] == n, what=f"restart {n}")
    assert s["mode"] == "cold" and s["reason"] == "cold boot requested", "no more restore attempts"
    started = [e for e in a.events() if e["event"] == "started"]
    assert [e["reason"].split(":")[0] for e in started] == ["host engine unusable here", "host engine unusable here",
                                                            "cold boot requested"]
    assert metric(a.get("/metrics"), "snapbuild_fallbacks_total", server="counter", reason="engine") == 2
    warned = [e for e in a.events() if e["event"] == "log" and e["level"] == "warning"]
    assert any(e["message"].startswith("counter:prod: not restored (host engine unusable here") and
               e["logger"] == "snapbuild.runner.restore" for e in warned), a.events()


def test_a_container_is_adopted_with_its_node_port_after_sigkill(agent, recipe, store, base_rootfs, tmp_path):
    first = container_counter(recipe, store, base_rootfs, "ccounter:prod", 2)
    port = free_port()
    state = tmp_path / "cstate"
    config = f'[[server]]\nname = "counter"\nref = "ccounter:prod"\npublish = {port}\n'
    a = agent(config, state_dir=state)
    s = a.wait(lambda s: s["state"] == "ready", what="ready", timeout=120)
    assert post(port, "/count")["count"] == 3
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL  # the node port goes with the agent; the container stays
    b = agent(config, state_dir=state)
    s2 = b.wait(lambda s: s["state"] == "ready", what="adopted", timeout=120)
    assert (s2["container"], s2["restarts"]) == (s["container"], 0) and s2["digest"] == first
    assert post(port, "/count")["count"] == 4, "the same container, served on the node port again"
    assert b.stop() == 0
    assert [c for c in subprocess.run(["runc", "list", "-q"], capture_output=True, text=True).stdout.split()
            if c.startswith("sb-ccounter")] == []


def test_a_recorded_pid_is_believed_only_with_its_start_time_and_boot(agent, tmp_path):
    """State records that name live, unrelated processes (the PID reused since, or a
    record from before a reboot, or from an agent that kept no identity) are neither
    adopted nor signalled, though the agent would stop an unwanted server."""
    from snapbuild.runtime.identity import ProcessIdentity

    strangers = [subprocess.Popen(["sleep", "600"]) for _ in range(3)]
    try:
        ids = [ProcessIdentity.of(p.pid) for p in strangers]
        state = tmp_path / "state"
        state.mkdir()
        (state / "agent.json").write_text(json.dumps({"servers": {
            "reused": {**ids[0].to_json(), "start": ids[0].start + 1, "digest": "sha256:" + "0" * 64},
            "before-reboot": {**ids[1].to_json(), "boot": "00000000-0000-0000-0000-000000000000"},
            "old-record": {"pid": ids[2].pid, "container": None},
        }}))
        # the one configured server has no snapshot: the agent keeps trying, and keeps running
        a = agent('[[server]]\nname = "missing"\nref = "missing:prod"\n', state_dir=state)
        a.wait(lambda s: s["last_error"] is not None, what="a first start attempt", name="missing")
        events = {e["server"]: e for e in a.events() if e["event"] == "not_adopted"}
        assert set(events) == {"reused", "before-reboot", "old-record"}, a.events()
        assert "another process" in events["reused"]["reason"]
        assert "booted" in events["before-reboot"]["reason"]
        assert "no start time" in events["old-record"]["reason"]
        assert a.stop() == 0
        assert all(p.poll() is None for p in strangers), "no stranger was signalled"
        assert not [e for e in a.events() if e["event"] in ("adopted", "stopped_unwanted")]
    finally:
        for p in strangers:
            p.kill()
            p.wait()


def test_one_hung_slot_does_not_stop_another_from_rolling(agent, recipe, store):
    """`stuck`'s registry accepts connections and never answers (its start hangs in
    its worker); `counter` beside it restores, and rolls when its tag moves."""
    import socket

    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    try:
        port = free_port()
        second = counter(recipe, store, port, tag="counter:v2", calls=5)
        first = counter(recipe, store, port)
        a = agent(f'[[server]]\nname = "stuck"\nref = "app:prod"\n'
                  f'registry = "oci://127.0.0.1:{blackhole.getsockname()[1]}/team"\n\n'
                  '[[server]]\nname = "counter"\nref = "counter:prod"\n', poll_s=0.5)
        a.wait(lambda s: s["state"] == "ready" and s["digest"] == first, what="counter v1")
        retag(store, "counter", second, "prod")
        a.wait(lambda s: s["state"] == "ready" and s["digest"] == second, what="the roll beside a hung slot")
        assert post(port, "/count")["count"] == 6
        stuck = a.server("stuck")
        assert stuck["state"] == "starting" and stuck["busy"]["job"] == "start", stuck
        assert json.loads(a.get("/healthz"))["ok"] is True, "the loop runs while a worker hangs"
    finally:
        blackhole.close()


def test_a_restore_that_fails_its_check_request_shows_in_the_state_and_the_metrics(agent, recipe, store, tmp_path):
    from test_restore_checks import DIFFERS, checked

    port, answer = free_port(), tmp_path / "answer.json"
    answer.write_text('{"token": 17}')
    [res] = build(checked(recipe, port, answer), store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    answer.write_text('{"token": 18}')
    a = agent('[[server]]\nname = "checked"\nref = "checked:v1"\n')
    s = a.wait(lambda s: s["state"] == "ready", what="ready", name="checked")
    assert s["mode"] == "cold" and s["verify"] == "different" and s["reason"].startswith(DIFFERS), s
    metrics = a.get("/metrics")
    assert metric(metrics, "snapbuild_restore_checks_total", server="checked", result="different") == 1
    assert metric(metrics, "snapbuild_fallbacks_total", server="checked", reason="verify") == 1
    [started] = [e for e in a.events() if e["event"] == "started"]
    assert started["verify"] == "different" and started["reason"].startswith(DIFFERS)
    kept = json.loads((tmp_path / "agent-state" / "agent.json").read_text())["servers"]["checked"]
    assert kept["verify"] == "different" and kept["reason"] == s["reason"], "an agent that adopts it says why, too"


class InProcessAgent:
    """An Agent run in this process (its loop in a thread, its API on a free port), so
    that the test can stand in for parts of the node: here its GPUs."""

    def __init__(self, config, store) -> None:
        import threading

        from snapbuild.runner.agent import Agent
        from snapbuild.runner.agent.api import start_api

        self.events: list[dict] = []
        self.agent = Agent(config, store=store, log=self.events.append)
        self.agent.adopt()
        self.api, self.port = start_api(self.agent), int(config.api.rpartition(":")[2])
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._run, daemon=True)
        self._loop.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.agent.tick()
            self._stop.wait(0.1)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return r.read().decode()

    def servers(self) -> dict[str, dict]:
        return {s["name"]: s for s in json.loads(self.get("/servers"))["servers"]}

    def wait(self, pred, what: str, timeout: float = 90) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            servers = self.servers()
            if pred(servers):
                return servers
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {servers}\n{self.events[-20:]}")

    def crash(self) -> None:
        """Stop the loop and the API and let go of the node ports, but not the servers (a SIGKILL)."""
        self._stop.set()
        self._loop.join()
        self.api.shutdown()
        self.api.server_close()
        for slot in self.agent.slots.values():
            if slot.proxy:
                slot.proxy.close()

    def stop(self) -> None:
        self._stop.set()
        self._loop.join()
        self.agent.shutdown()
        self.api.shutdown()
        self.api.server_close()


def test_servers_get_gpus_of_their_own_wait_for_one_and_keep_them_across_a_restart(recipe, store, tmp_path,
                                                                                   monkeypatch):
    """On a node of 2 GPUs (nvidia-smi stands in), three servers of one snapshot with
    `gpus = 1` each: two start on different GPUs, the third waits and says for what,
    and starts on the GPU of one that stops. An agent started again adopts the servers
    with their GPUs."""
    import inspect

    import fakenvidia

    from snapbuild.runner import restore
    from snapbuild.runner.agent import AgentConfig, ServerConfig

    uuids = ["GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000001", "GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000002"]
    rows = "".join(f"{i}, NVIDIA B200, {u}, 10.0, 183359, 570.86.15, Disabled\n" for i, u in enumerate(uuids))
    monkeypatch.setenv("PATH", f"{fakenvidia.install(tmp_path / 'nvidia', rows)}:{os.environ['PATH']}")
    given: dict[str, list[str] | None] = {}  # each start's gpus, by the server's pid
    real_run = restore.run
    takes_gpus = "gpus" in inspect.signature(real_run).parameters

    def run(ref, *, gpus=None, **kw):
        # restore.run places a start on its GPUs; where it does not take them yet, a no-op pass-through
        out = real_run(ref, gpus=gpus, **kw) if takes_gpus else {**real_run(ref, **kw), "gpus": gpus}
        given[out["pid"]] = gpus
        return out

    monkeypatch.setattr(restore, "run", run)
    port = free_port()
    counter(recipe, store, port, isolation="namespaces")
    ports = {n: free_port() for n in "abc"}
    config = AgentConfig(servers=[ServerConfig(name=n, ref="counter:prod", publish=ports[n], gpus=1,
                                               backoff_s=60 if n == "a" else 1) for n in "abc"],
                         api=f"127.0.0.1:{free_port()}", state_dir=tmp_path / "state", poll_s=3600)
    first = InProcessAgent(config, store)
    try:
        s = first.wait(lambda s: s["a"]["state"] == s["b"]["state"] == "ready" and s["c"]["state"] == "waiting",
                       "a and b ready, c waiting")
        assert {s["a"]["gpus"][0]["uuid"], s["b"]["gpus"][0]["uuid"]} == set(uuids), "a GPU each, not the same one"
        assert [g["index"] for g in s["a"]["gpus"]] == [0] and [g["index"] for g in s["b"]["gpus"]] == [1]
        assert given[s["a"]["pid"]] == [uuids[0]] and given[s["b"]["pid"]] == [uuids[1]], "each start got its GPU"
        assert s["c"]["last_error"] == "waiting for 1 free GPU(s): held by a, b" and s["c"]["pid"] is None
        assert post(ports["a"], "/count")["count"] == 3 and post(ports["b"], "/count")["count"] == 3
        metrics = first.get("/metrics")
        assert metric(metrics, "snapbuild_gpu_assigned", gpu="0", uuid=uuids[0], server="a") == 1
        assert metric(metrics, "snapbuild_gpu_assigned", gpu="1", uuid=uuids[1], server="b") == 1
        assert metric(metrics, "snapbuild_gpu_assigned", server="c") is None
        assert metric(metrics, "snapbuild_gpus_free") == 0

        restore.stop(s["a"]["pid"])  # a stops (and restarts only in a minute): its GPU goes to c
        s = first.wait(lambda s: s["c"]["state"] == "ready", "c on a's GPU")
        assert [g["uuid"] for g in s["c"]["gpus"]] == [uuids[0]] and given[s["c"]["pid"]] == [uuids[0]]
        assert s["a"]["state"] == "restarting" and s["a"]["gpus"] == [] and s["a"]["pid"] is None
        assert post(ports["c"], "/count")["count"] == 3, "c serves, on its own node port"
        metrics = first.get("/metrics")
        assert metric(metrics, "snapbuild_gpu_assigned", gpu="0", uuid=uuids[0], server="a") is None
        assert metric(metrics, "snapbuild_gpu_assigned", gpu="0", uuid=uuids[0], server="c") == 1
        assert [e["server"] for e in first.events if e["event"] == "gpus_freed"] == ["a"]
    except BaseException:
        first.stop()
        raise
    first.crash()
    second = InProcessAgent(config, store)  # the same node and state: it adopts b and c, on their GPUs
    try:
        s2 = second.wait(lambda s: s["a"]["state"] == "waiting", "a waiting")
        assert (s2["b"]["pid"], s2["c"]["pid"]) == (s["b"]["pid"], s["c"]["pid"]), "adopted, not started again"
        assert s2["b"]["gpus"] == s["b"]["gpus"] and s2["c"]["gpus"] == s["c"]["gpus"]
        assert s2["a"]["last_error"] == "waiting for 1 free GPU(s): held by c, b"
        assert post(ports["b"], "/count")["count"] == 4
    finally:
        second.stop()
        leaked = [pid for pid in given if alive(pid)]
        for pid in leaked:  # whatever failed above, no server outlives the test
            restore.stop(pid)
    assert not leaked, f"servers the agent started are still running: {leaked}"
    assert not alive(s["b"]["pid"]) and not alive(s["c"]["pid"])


def test_a_hostile_snapshot_is_tried_once_then_backed_off_with_the_reason_in_servers(agent, tmp_path):
    """A snapshot refused as hostile is not retried on the crash-loop back-off (each try
    is a pull and a check): the slot is `refused`, /servers says which digest and why,
    and only a new digest on its tag is tried before the back-off ends."""
    from test_hostile import Forge
    from test_hostile_trees import DEPTH, deep_tree

    forge = Forge(tmp_path / "forge")
    url = f"file://{tmp_path / 'evil-registry'}"
    first = forge.snapshot({"app": deep_tree(forge)})
    forge.publish(url, "evil", "1", first)
    a = agent(f'registry = "{url}"\n[[server]]\nname = "evil"\nref = "evil:1"\n', poll_s=0.5,
              env={"SNAPBUILD_HOME": str(tmp_path / "node")})
    s = a.wait(lambda s: s["state"] == "refused", what="refused", name="evil")
    assert s["refused"]["digest"] == first
    assert "257 folders deep" in s["refused"]["reason"] and "257 folders deep" in s["last_error"], s
    assert s["refused"]["retry_in_s"] > 30 and s["pid"] is None

    def tries() -> list[dict]:
        return [e for e in a.events() if e["event"] in ("snapshot_refused", "start_failed", "started")]

    time.sleep(5)  # ten polls of its tag, and several crash-loop back-offs (1, 2, 4 s)
    assert [(e["event"], e["digest"]) for e in tries()] == [("snapshot_refused", first)], tries()
    assert a.server("evil")["state"] == "refused"

    second = forge.snapshot({"app": deep_tree(forge, DEPTH + 1)})  # the tag moves: tried at once
    forge.publish(url, "evil", "1", second)
    a.wait(lambda s: (s["refused"] or {}).get("digest") == second, what="the new digest refused", name="evil")
    time.sleep(2)
    assert [e["digest"] for e in tries()] == [first, second], tries()


def test_the_agent_warns_when_its_api_listens_beyond_loopback(tmp_path, home):
    from snapbuild.runner.agent.api import exposure_warning

    for address in ("127.0.0.1:9411", "127.3.0.1:1", "localhost:1", "[::1]:1", ":9411", "unix:/run/a.sock"):
        assert exposure_warning(address) is None, address
    for address in ("0.0.0.0:9411", "10.1.2.3:9411", "[::]:9411", "node7.internal:9411"):
        assert "beyond loopback" in exposure_warning(address), address
    for bind in ("0.0.0.0", "127.0.0.1"):
        port = free_port()
        config = tmp_path / f"agent-{bind}.toml"
        config.write_text(f'api = "{bind}:{port}"\nstate_dir = "{tmp_path / "state"}"\n'
                          f'[[server]]\nname = "x"\nref = "nothing:1"\nregistry = "file://{tmp_path / "empty"}"\n')
        a = AgentProc(config, port, tmp_path / f"agent-{bind}.log")
        try:
            deadline = time.monotonic() + 30
            while not any(e["event"] == "serving" for e in a.events()):
                assert a.proc.poll() is None and time.monotonic() < deadline, a.log_path.read_text()
                time.sleep(0.1)
            assert json.loads(a.get("/healthz"))["ok"]  # over loopback, whatever it binds
            warned = [e for e in a.events() if e["event"] == "warning" and "beyond loopback" in e["message"]]
            if bind == "0.0.0.0":
                assert len(warned) == 1 and f"listens on 0.0.0.0:{port}" in warned[0]["message"], a.events()
                assert f'bind it to 127.0.0.1 (api = "127.0.0.1:{port}"' in warned[0]["message"]
                assert "/servers" in warned[0]["message"] and "log" in warned[0]["message"]
            else:
                assert warned == [], warned
        finally:
            assert a.stop() == 0
