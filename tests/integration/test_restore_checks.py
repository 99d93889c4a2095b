"""A checkpoint's check requests (`verify:`), with the real CRIU: the warm-up records
the answer, every restore replays it before the server counts as ready, and a server
that answers otherwise is stopped and booted cold with the reason.

The server (data/counter_server.py) answers GET /answer with a file read at each
request: changing the file between the build and the restore stands for a restored
process whose state is not the warm-up's (a missing device buffer, a wrong mapping).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import RestoreFailed, run, stop

from test_criu_snapshots import load_runtime, no_server_left  # tests/integration/
from testkit import free_port, get, port_free

pytestmark = pytest.mark.integration

COUNTER = Path(__file__).parent / "data" / "counter_server.py"
DIFFERS = "restored server answered the check request differently"


def checked(recipe, port: int, answer: Path, verify: str = '{http: "GET /answer"}') -> Path:
    path = recipe(f"""
        name: checked
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            run: "{sys.executable} $SNAPBUILD_INPUTS/app/counter_server.py --port {port} --answer-file {answer}"
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
            exercise: [{{http: "POST /count"}}]
          snap: {{kind: checkpoint, process: server, verify: [{verify}]}}
        publish: {{tag: "checked:v1"}}
    """)
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(COUNTER, path.parent / "app" / "counter_server.py")
    return path


@pytest.fixture
def snapshot(recipe, store, tmp_path):
    port, answer = free_port(), tmp_path / "answer.json"
    answer.write_text('{"token": 17, "logprob": -0.25}')
    [res] = build(checked(recipe, port, answer), store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    return port, answer


def test_the_warm_up_answer_is_recorded_and_a_faithful_restore_passes(snapshot, store):
    port, answer = snapshot
    [check] = load_runtime(store, "checked:v1")["verify"]
    assert check["http"] == "GET /answer" and check["answer"]["head"] == answer.read_text()
    out = run("checked:v1", store=store)
    try:
        assert out["mode"] == "restore" and out["verify"] == "same" and "verify_s" in out["timings"], out
        assert get(port, "/answer") == answer.read_bytes()
    finally:
        stop(out["pid"])
    cold = run("checked:v1", store=store, mode="cold")
    try:
        assert cold["mode"] == "cold" and cold["verify"] == "not asked", "a cold boot is not checked"
    finally:
        stop(cold["pid"])


def test_a_restored_server_that_answers_otherwise_is_stopped_and_booted_cold(snapshot, store, run_cli):
    port, answer = snapshot
    answer.write_text('{"token": 17, "logprob": -9.75}')  # the restored process is not the warm one
    out = run("checked:v1", store=store)
    try:
        assert out["mode"] == "cold" and out["verify"] == "different", out
        assert out["reason"].startswith(DIFFERS), out["reason"]
        assert "-9.75" in out["reason"] and "at the warm-up HTTP 200" in out["reason"] and "-0.25" in out["reason"]
        assert get(port, "/answer") == answer.read_bytes(), "the cold server serves"
    finally:
        stop(out["pid"])
    assert port_free(port) and no_server_left("counter_server.py"), "the restored server was stopped"
    with pytest.raises(RestoreFailed, match=DIFFERS):
        run("checked:v1", store=store, fallback="fail")
    assert port_free(port), "--fallback fail starts nothing"

    r = run_cli("restore", "checked:v1", "--json", tool="snapbuild-runner")
    assert r.code == 0, r.err
    shown = json.loads(r.out)
    try:
        assert shown["verify"] == "different" and shown["reason"].startswith(DIFFERS)
    finally:
        stop(shown["pid"])


def test_a_check_whose_answer_changes_between_calls_fails_the_build(recipe, store, tmp_path):
    port = free_port()
    [res] = build(checked(recipe, port, tmp_path / "unused", verify='{http: "POST /count"}'), store=store)
    assert not res.ok
    err = res.steps["snap"].error
    assert "verify 0 (POST /count) answered differently on two calls in a row" in err, err
    assert port_free(port) and no_server_left("counter_server.py")


def in_a_child(fn) -> dict:
    """``fn()`` in a forked child, its result (or its exception's type and message) as
    JSON: bench makes its process a child subreaper, which must not outlive the call
    in the test process (orphans of later tests would be left as its zombies)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            out = {"result": fn()}
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"error": type(e).__name__, "message": str(e)}
        with os.fdopen(w, "w") as f:
            json.dump(out, f, default=str)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_bench_counts_how_restored_servers_answered(snapshot, store):
    from snapbuild.runner.bench import bench

    port, answer = snapshot
    r = in_a_child(lambda: bench("checked:v1", runs=1, store=store, drop=False))["result"]
    assert r["verify"] == {"same": 2} and "note" not in r, r  # the first restore on the node, then one run
    # and bench asked every server itself: the first restore, a cold boot and a restore
    assert r["answers"] == {"compared": "verify (1 request)", "same": True, "asked": 3, "different": 0,
                            "first_difference": None}, r["answers"]

    def change_after_the_first_run(msg: str) -> None:  # the second run's restore answers otherwise
        if "run 1/2 restore" in msg:
            answer.write_text("changed")

    r = in_a_child(lambda: bench("checked:v1", runs=2, store=store, drop=False,
                                 progress=change_after_the_first_run))["result"]
    assert r["verify"] == {"same": 2, "different": 1}, r
    assert r["note"].startswith("1 restore(s) fell back to a cold boot (left out of restore_s), first because: "
                                + DIFFERS), r["note"]
    assert len(r["warm"]["restore_s"]["runs"]) == 1 and len(r["warm"]["cold_s"]["runs"]) == 2
    # the second cold boot, and the restore that fell back to one, answer what the file says now
    assert r["answers"]["same"] is False and (r["answers"]["asked"], r["answers"]["different"]) == (5, 2), r
    assert r["answers"]["first_difference"].startswith("run 2 (warm page cache, cold): verify 0 (GET /answer) "
                                                       "answered HTTP 200, 7 bytes"), r["answers"]
    failed = in_a_child(lambda: bench("checked:v1", runs=1, store=store, drop=False))
    assert failed["error"] == "RestoreFailed", failed
    assert failed["message"].startswith("the first restore of checked:v1 fell back to a cold boot: " + DIFFERS)
    assert port_free(port)
