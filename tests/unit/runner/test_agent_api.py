"""The agent's API in process, over real HTTP: health follows the supervisor loop, bad
input gets a 4xx with a JSON error, never a traceback."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from snapbuild.runner.agent import Agent, AgentConfig, ServerConfig, State
from snapbuild.runner.agent.api import start_api
from snapbuild.store import Store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api(tmp_path):
    port = free_port()
    agent = Agent(AgentConfig(servers=[ServerConfig(name="web", ref="web:prod")], api=f"127.0.0.1:{port}",
                              state_dir=tmp_path / "state", stale_after_s=5),
                  store=Store(tmp_path / "home"), log=lambda record: None)
    httpd = start_api(agent)

    def get(path: str) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                status, body = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    yield agent, get
    httpd.shutdown()


def test_healthz_fails_once_the_supervisor_loop_stops_running(api):
    agent, get = api
    agent.last_tick = time.monotonic()  # the loop just ran
    status, body = get("/healthz")
    assert status == 200 and body["ok"] is True
    agent.last_tick = time.monotonic() - 30  # the loop is stuck (bound: 5 s)
    status, body = get("/healthz")
    assert status == 503 and body["ok"] is False and "has not run for 30 s (bound 5 s)" in body["error"]
    status, text = get("/metrics")
    assert status == 200 and "snapbuild_agent_loop_age_seconds 3" in text


@pytest.mark.parametrize("query", ["lines=abc", "lines=-5", "lines=0", "lines=10000000", "lines=1e3"])
def test_bad_log_queries_answer_400_with_the_reason(api, query):
    _agent, get = api
    status, body = get(f"/servers/web/log?{query}")
    assert status == 400 and "lines must be a whole number" in body["error"], body


def test_unknown_servers_and_paths_answer_404_in_json(api):
    _agent, get = api
    status, body = get("/servers/nope/log")
    assert status == 404 and "no server named 'nope'" in body["error"]
    status, body = get("/nothing/here")
    assert status == 404 and "/servers" in body["error"]


def test_a_failing_handler_answers_500_not_a_traceback(api, monkeypatch):
    agent, get = api
    monkeypatch.setattr(type(agent.slots["web"]), "view", lambda self: 1 / 0)
    status, body = get("/servers")
    assert status == 500 and "ZeroDivisionError" in body["error"]


def test_the_view_shows_the_state_and_what_its_worker_does(api):
    agent, get = api
    slot = agent.slots["web"]
    slot.state, slot.job, slot.job_since = State.RESTARTING, "start", time.monotonic() - 12
    _status, body = get("/servers")
    [view] = body["servers"]
    assert view["state"] == "restarting" and view["busy"]["job"] == "start" and view["busy"]["for_s"] >= 12
