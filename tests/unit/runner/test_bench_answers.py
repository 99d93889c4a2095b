"""`snapbuild bench` proves answers with the snapshot's own check requests (`verify`):
every server, cold or restored, is asked them and must answer as the warm-up did; an
error status is never an answer, and a snapshot without check requests is reported as
compared with nothing.

The server is a real HTTP server on 127.0.0.1; the runner's restore and cold boot are
fakes that point at it (the real ones, with CRIU, are in
tests/integration/test_restore_checks.py).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from snapbuild.runner import bench as benchmod
from snapbuild.runtime import probe as probes
from snapbuild.schema import ServerSpec


class Server:
    """Answers ``GET /answer`` with ``body`` (status ``status``); every other request 404."""

    def __init__(self) -> None:
        self.body, self.status = b'{"token": 17}', 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                status, body = (outer.status, outer.body) if self.path == "/answer" else (404, b"not found")
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.http.shutdown()
    s.http.server_close()


def runtime_for(server: Server, tmp_path, verify: list[dict]) -> SimpleNamespace:
    root = str(tmp_path / "run-root")
    spec = ServerSpec(name="s", argv=["serve"], ready={"http": f"http://127.0.0.1:{server.port}/healthz"},
                      run_root=root, run_dir=f"{root}/run/s-{'0' * 16}")
    recorded = probes.record_checks(verify, base=f"http://127.0.0.1:{server.port}", log=lambda m: None)
    return SimpleNamespace(verify=recorded, server=spec, images_tree="sha256:" + "0" * 64, stats={})


@pytest.fixture
def fake_runner(monkeypatch):
    """bench with the runner's pull, restore, cold boot and stop faked: each start is the
    same live server; ``starts`` records the modes, ``on_start(mode)`` may change it."""
    state = SimpleNamespace(runtime=None, starts=[], on_start=lambda mode: None)

    def run(ref, *, registry=None, mode="auto", store=None):
        real = "restore" if mode == "auto" else mode
        state.starts.append(real)
        state.on_start(real)
        port = probes.address(state.runtime.server.ready)[1]
        return {"mode": real, "reason": None if real == "restore" else "cold boot requested", "pid": 99999,
                "address": f"127.0.0.1:{port}", "timings": {"total_s": 0.5 if real == "cold" else 0.1},
                "verify": ("same" if real == "restore" else "not asked") if state.runtime.verify else None}

    monkeypatch.setattr("snapbuild.registry.locate", lambda ref, registry: (ref, None))
    monkeypatch.setattr(benchmod, "pull", lambda *a, **k: {"snapshot": SimpleNamespace(runtime=state.runtime)})
    monkeypatch.setattr(benchmod, "run", run)
    monkeypatch.setattr(benchmod, "stop", lambda target: True)
    monkeypatch.setattr(benchmod.process, "become_subreaper", lambda: None)
    monkeypatch.setattr(benchmod.probes, "port_in_use", lambda addr: False)  # the live server stays up
    return state


def bench(state, runtime, runs: int = 1) -> dict:
    state.runtime = runtime
    return benchmod.bench("s:v1", runs=runs, store=SimpleNamespace(), drop=False)


def test_every_server_answers_the_check_requests_as_the_warm_up_did(server, fake_runner, tmp_path):
    runtime = runtime_for(server, tmp_path, [{"http": "GET /answer"}, {"http": f"GET http://127.0.0.1:{server.port}/answer"}])
    r = bench(fake_runner, runtime, runs=2)
    assert fake_runner.starts == ["restore", "cold", "restore", "cold", "restore"]
    assert r["answers"] == {"compared": "verify (2 requests)", "same": True, "asked": 5, "different": 0,
                            "first_difference": None}, r["answers"]
    assert "answers_match" not in r


def test_a_cold_boot_that_answers_otherwise_is_reported(server, fake_runner, tmp_path):
    runtime = runtime_for(server, tmp_path, [{"http": "GET /answer"}])

    def on_start(mode: str) -> None:  # a cold boot computes another answer than the warm, restored one
        server.body = b'{"token": 18}' if mode == "cold" else b'{"token": 17}'

    fake_runner.on_start = on_start
    a = bench(fake_runner, runtime, runs=2)["answers"]
    assert a["same"] is False and a["asked"] == 5 and a["different"] == 2, a
    assert a["first_difference"].startswith("run 1 (warm page cache, cold): verify 0 (GET /answer) answered HTTP "
                                            "200, 13 bytes"), a["first_difference"]
    assert '{"token": 18}' in a["first_difference"] and 'at the warm-up HTTP 200' in a["first_difference"]


def test_an_error_status_in_both_modes_is_no_answer(server, fake_runner, tmp_path):
    runtime = runtime_for(server, tmp_path, [{"http": "GET /answer"}])
    server.status, server.body = 404, b"not found"  # from now on: every server, cold or restored, answers 404
    a = bench(fake_runner, runtime)["answers"]
    assert a["same"] is False and a["different"] == a["asked"] == 3, a
    assert "answered HTTP 404" in a["first_difference"], a


def test_check_requests_that_expect_an_error_compare_nothing(server, fake_runner, tmp_path):
    runtime = runtime_for(server, tmp_path, [{"http": "POST /infer", "expect": 404}])  # vLLM has no /infer
    a = bench(fake_runner, runtime)["answers"]
    assert a == {"compared": None, "why": "its check requests all expect an error status, which proves nothing"}


def test_a_snapshot_without_check_requests_compares_nothing_and_says_so(server, fake_runner, tmp_path):
    a = bench(fake_runner, runtime_for(server, tmp_path, []))["answers"]
    assert a["compared"] is None and a["why"].startswith("the snapshot has no check requests (`verify:` in its "
                                                          "checkpoint step)"), a


def test_the_text_report_says_plainly_what_was_compared(monkeypatch):
    from snapbuild.cli.main import cli

    phase = {"cold_s": {"median": 2.0}, "restore_s": {"median": 0.2}, "speedup": 10.0}
    report = {"warm": phase, "page_cache_dropped": None, "restore_first_s": 0.3,
              "answers": {"compared": None, "why": "the snapshot has no check requests"}}
    monkeypatch.setattr(benchmod, "bench", lambda *a, **k: report)
    out = CliRunner().invoke(cli, ["bench", "s:v1", "--runs", "1"]).output
    assert "  answers: not compared (the snapshot has no check requests)\n" in out, out
    report["answers"] = {"compared": "verify (1 request)", "same": False, "asked": 3, "different": 1,
                         "first_difference": "run 1 (warm page cache, cold): verify 0 (GET /a) answered HTTP 500"}
    out = CliRunner().invoke(cli, ["bench", "s:v1", "--runs", "1"]).output
    assert ("  answers: DIFFERENT from the warm-up's on 1 of 3 servers (verify (1 request)); first: run 1 (warm page "
            "cache, cold): verify 0 (GET /a) answered HTTP 500\n") in out, out


def test_a_restore_asks_a_check_written_as_the_servers_url_where_this_node_reaches_it(server, tmp_path):
    """A check request may name the server's own URL as it was built (port 8080 here);
    a restored server is asked on the address this node reaches it (a published port)."""
    from snapbuild.runner.restore import _verify

    runtime = runtime_for(server, tmp_path, [{"http": "GET /answer"}])
    runtime.verify = [{**c, "http": "GET http://127.0.0.1:8080/answer"} for c in runtime.verify]
    timings: dict = {}
    _verify(runtime, {"http": f"http://127.0.0.1:{server.port}/healthz"}, timings, give_up=lambda: None)
    assert "verify_s" in timings, "asked and answered alike: no error raised"
