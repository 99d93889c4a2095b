"""Check requests (a checkpoint's ``verify``): recorded at the warm-up, compared after
a restore (runtime/probe.py), against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from snapbuild.runtime import probe as probes
from snapbuild.steps.checkpoint import CheckpointSpec


@pytest.fixture
def server():
    """Answers every request with ``state["body"]`` (then ``state["next"]``, if set)."""
    state: dict = {"body": b'{"y": 42.0}', "status": 200, "next": None}

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = state["body"]
            if state["next"] is not None:
                state["body"] = state["next"]
            self.send_response(state["status"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    state["base"] = f"http://127.0.0.1:{srv.server_address[1]}"
    yield state
    srv.shutdown()
    srv.server_close()


CHECK = {"http": "POST /infer", "body": '{"x": 1}', "headers": {}, "repeat": 1}


def test_a_check_is_recorded_and_a_restored_server_that_answers_alike_passes(server):
    [rec] = probes.record_checks([CHECK], base=server["base"], log=lambda m: None)
    assert rec["answer"]["status"] == 200 and rec["answer"]["bytes"] == 11 and rec["answer"]["head"] == '{"y": 42.0}'
    assert "repeat" not in rec and rec["body"] == CHECK["body"]
    assert probes.check_answers([rec], base=server["base"]) is None


def test_a_different_answer_is_said_with_both_answers(server):
    [rec] = probes.record_checks([CHECK], base=server["base"], log=lambda m: None)
    server["body"] = b'{"y": 41.9}'
    why = probes.check_answers([rec], base=server["base"])
    assert why is not None and "verify 0 (POST /infer)" in why
    assert "'{\"y\": 41.9}'" in why and "at the warm-up HTTP 200, 11 bytes" in why and "'{\"y\": 42.0}'" in why
    server["body"], server["status"] = b'{"y": 42.0}', 500
    assert "answered HTTP 500" in probes.check_answers([rec], base=server["base"]), "the status counts too"


def test_a_check_that_gets_no_answer_counts_as_different(server):
    [rec] = probes.record_checks([CHECK], base=server["base"], log=lambda m: None)
    why = probes.check_answers([rec], base="http://127.0.0.1:1")
    assert why is not None and "got no answer" in why


def test_an_answer_that_changes_between_calls_fails_the_warm_up(server):
    """Such a check (a counter, a clock, sampling) would send every restore cold."""
    server["next"] = b'{"y": 43.0}'
    with pytest.raises(probes.ProbeFailed, match=r"answered differently on two calls in a row .*\(no counters"):
        probes.record_checks([CHECK], base=server["base"], log=lambda m: None)


def test_a_check_with_the_wrong_status_fails_the_warm_up(server):
    server["status"] = 503
    with pytest.raises(probes.ProbeFailed, match=r"verify 0 \(POST /infer\) answered 503, expected 200"):
        probes.record_checks([CHECK], base=server["base"], log=lambda m: None)
    assert probes.record_checks([{**CHECK, "expect": 503}], base=server["base"], log=lambda m: None)


@pytest.mark.parametrize("check,message", [
    ({"run": "curl localhost:8000"}, r"a check is an HTTP request"),
    ({"http": "GET http://10.0.0.1/x"}, r"a check request goes to the server: give a path"),
    ({"http": "GET /x", "repeat": 2}, r"asked once per restore"),
])
def test_a_recipe_check_is_one_request_to_the_server(check, message):
    with pytest.raises(ValueError, match=message):
        CheckpointSpec(kind="checkpoint", process="server", verify=[check])
    assert CheckpointSpec(kind="checkpoint", process="server", verify=[{"http": "/x"}]).verify[0].http == "/x"


def test_compare_paths_leave_out_ids_and_times(server):
    """An OpenAI-style answer carries an id and a timestamp: the whole body changes on
    every call, the compared paths do not."""
    answers = iter(range(100))

    def body() -> bytes:
        n = next(answers)
        return json.dumps({"id": f"cmpl-{n}", "created": 1700000000 + n,
                           "choices": [{"text": " Paris", "logprobs": {"token_logprobs": [-0.0123]}}]}).encode()

    server["body"], server["next"] = body(), body()
    with pytest.raises(probes.ProbeFailed, match="answered differently on two calls"):
        probes.record_checks([CHECK], base=server["base"], log=lambda m: None)
    check = {**CHECK, "compare": ["choices.0.text", "choices.0.logprobs", "usage.missing"]}
    server["body"] = body()
    [rec] = probes.record_checks([check], base=server["base"], log=lambda m: None)
    assert rec["answer"]["head"].startswith('{"choices.0.logprobs":{"token_logprobs":[-0.0123]}')
    assert probes.check_answers([rec], base=server["base"]) is None
    server["next"] = json.dumps({"id": "cmpl-x", "choices": [{"text": " Lyon", "logprobs": None}]}).encode()
    server["body"] = server["next"]
    assert "Lyon" in probes.check_answers([rec], base=server["base"])
    server["body"] = server["next"] = b"<html>oops</html>"
    assert "not JSON: <html>" in probes.check_answers([rec], base=server["base"])
