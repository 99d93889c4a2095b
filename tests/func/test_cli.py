"""The real `snapbuild` and `snapbuild-runner` commands, run as a user runs them."""

from __future__ import annotations

RECIPE = """
name: demo
vars: {v: "1"}
steps:
  src: {kind: files, include: ["*.txt"]}
  up:
    kind: command
    needs: [src]
    run: tr a-z A-Z < "$SNAPBUILD_INPUTS/src/in.txt" > up.txt; echo uppercased
    outputs: [up.txt]
  count: {kind: command, needs: [src], run: "wc -c < $SNAPBUILD_INPUTS/src/in.txt > n.txt", outputs: [n.txt]}
  join: {kind: command, needs: [up, count], run: "echo {{ v }} > v.txt", outputs: [v.txt]}
publish: {tag: "demo:{{ v }}"}
"""


def make(project, recipe):
    (project / "in.txt").write_text("hello\n")
    return recipe(RECIPE)


def test_help_teaches(run_cli):
    r = run_cli("--help")
    assert r.code == 0 and "Quick start" in r.out and "SNAPBUILD_HOME" in r.out
    for cmd in ("build", "plan", "logs", "ls", "inspect", "cache"):
        assert cmd in r.out
    r = run_cli("build", "--help")
    assert "--keep-going" in r.out and "--jobs" in r.out and "Exit status" in r.out
    r = run_cli("--help", tool="snapbuild-runner")
    assert r.code == 0 and "pull" in r.out


def test_plan_build_rebuild_json(run_cli, project, recipe):
    path = make(project, recipe)
    r = run_cli("plan", path, "--json")
    assert r.code == 0, r
    steps = r.json()["steps"]
    assert [s["name"] for s in steps] == ["src", "count", "up", "join"]
    assert {s["action"] for s in steps} == {"run"} and {s["reason"] for s in steps} == {"never built"}
    assert all(set(s) == {"name", "kind", "key", "action", "reason"} and len(s["key"]) == 64 for s in steps)

    r = run_cli("build", path, "--json", "--progress", "plain")
    assert r.code == 0, r
    out = r.json()
    assert [s["status"] for s in out["steps"]] == ["built"] * 4
    assert out["snapshot"].startswith("sha256:") and out["tag"] == "demo:1"
    assert "built   up" in r.err, "plain progress goes to stderr"

    r = run_cli("build", path, "--json")
    assert [s["status"] for s in r.json()["steps"]] == ["cached"] * 4
    assert r.json()["snapshot"] == out["snapshot"]

    r = run_cli("plan", path)
    assert r.code == 0 and "4 steps, 0 to run, 4 cached" in r.out


def test_plan_text_shows_why(run_cli, project, recipe):
    path = make(project, recipe)
    run_cli("build", path)
    (project / "in.txt").write_text("changed\n")
    r = run_cli("plan", path, "--set", "v=2")
    lines = {line.split()[0]: line for line in r.out.splitlines()[2:]}
    assert lines["src"].endswith("files changed: in.txt")
    assert lines["up"].endswith("input src changed")
    assert lines["join"].endswith("spec.run changed")


def test_recipe_error_exit_code_and_message(run_cli, recipe):
    path = recipe("name: demo\nsteps:\n  s: {kind: command, rnu: x}\n")
    r = run_cli("build", path)
    assert r.code == 3
    assert f"ERROR {path}:3:22: steps -> s -> rnu: unknown key 'rnu'" in r.err
    assert "TIP   did you mean 'run'?" in r.err
    assert "    3 |   s: {kind: command, rnu: x}" in r.err
    r = run_cli("plan", path, "--json")
    assert r.code == 3 and r.json()["error"]["line"] == 3 and r.json()["error"]["type"] == "RecipeError"


def test_failed_step_exit_code_log_tail_and_logs(run_cli, recipe):
    path = recipe("""
        name: demo
        steps:
          ok: {kind: command, run: "true"}
          bad: {kind: command, run: "echo something broke; exit 7"}
    """)
    r = run_cli("build", path, "--progress", "plain")
    assert r.code == 4, r
    assert "failed  bad" in r.err and "command exited with status 7" in r.err
    assert "| something broke" in r.err
    assert "snapbuild logs" in r.err
    r = run_cli("build", path, "--json")
    assert r.code == 4 and r.json()["snapshot"] is None
    assert {s["name"]: s["status"] for s in r.json()["steps"]}["bad"] == "failed"
    r = run_cli("logs", path, "bad")
    assert r.code == 0 and "something broke" in r.out
    r = run_cli("logs", path, "nosuch")
    assert r.code == 6 and "has no step 'nosuch'" in r.err


def test_ls_inspect_and_runner_pull(run_cli, project, recipe, tmp_path):
    path = make(project, recipe)
    built = run_cli("build", path, "--json").json()
    r = run_cli("ls", "--json")
    assert r.json() == {"snapshots": [{"name": "demo", "tag": "1", "digest": built["snapshot"]}]}
    r = run_cli("inspect", "demo:1", "--json")
    info = r.json()
    assert info["digest"] == built["snapshot"] and [o["step"] for o in info["outputs"]] == ["join"]
    assert r.code == 0 and "join" in run_cli("inspect", "demo:1").out
    r = run_cli("inspect", "demo:2")
    assert r.code == 6 and "has no tag '2'" in r.err

    reg = f"file://{tmp_path / 'home' / 'registry'}"
    r = run_cli("pull", "demo:1", "--registry", reg, "--dest", tmp_path / "out", "--json",
                tool="snapbuild-runner", env={"SNAPBUILD_HOME": str(tmp_path / "node")})
    assert r.code == 0, r
    assert (tmp_path / "out" / "join" / "v.txt").read_text() == "1\n"
    r = run_cli("pull", "nothere:1", "--registry", reg, tool="snapbuild-runner")
    assert r.code == 6 and "ERROR" in r.err


def test_cache_commands_and_flipped_byte(run_cli, project, recipe, home):
    path = make(project, recipe)
    run_cli("build", path)
    r = run_cli("cache", "ls", "--json")
    assert sorted(e["name"] for e in r.json()["entries"]) == ["count", "join", "src", "up"]
    assert run_cli("cache", "du", "--json").json()["steps"] == 4
    assert run_cli("cache", "verify").code == 0

    blob = next(p for p in (home / "blobs" / "sha256").iterdir())
    data = bytearray(blob.read_bytes())
    data[0] ^= 0x40
    blob.write_bytes(bytes(data))
    r = run_cli("cache", "verify")
    assert r.code == 5 and "corrupt blob sha256:" + blob.name in r.out and "--repair" in r.err
    assert run_cli("cache", "verify", "--repair").code == 0
    assert run_cli("build", path).code == 0
    r = run_cli("cache", "verify", "--json")
    assert r.code == 0 and r.json()["ok"] is True

    r = run_cli("cache", "gc", "--json")
    assert r.code == 0 and r.json()["dry_run"] is False
    assert run_cli("cache", "gc", "--older-than", "soon").code == 2


def test_matrix_builds(run_cli, recipe):
    path = recipe("""
        name: mx
        matrix: {size: [s, m]}
        steps:
          a: {kind: command, run: "echo {{ size }} > a.txt", outputs: [a.txt]}
        publish: {tag: "mx-{{ size }}:dev"}
    """)
    r = run_cli("build", path, "--json")
    assert r.code == 0, r
    builds = r.json()["builds"]
    assert [b["name"] for b in builds] == ["mx[size=s]", "mx[size=m]"]
    assert sorted(x["name"] for x in run_cli("ls", "--json").json()["snapshots"]) == ["mx-m", "mx-s"]
    r = run_cli("plan", path, "--set", "size=m", "--json")
    assert [s["action"] for s in r.json()["steps"]] == ["cached"]
    assert run_cli("build", path, "--tag", "x:y").code == 2


def test_bad_registry_fails_before_any_step_runs(run_cli, recipe, tmp_path):
    marker = tmp_path / "ran"
    path = recipe(f"name: demo\nsteps:\n  s: {{kind: command, run: 'touch {marker}'}}\n")
    r = run_cli("build", path, "--registry", "ftp://nowhere/x")
    assert r.code == 2 and "not supported" in r.err
    assert not marker.exists()


def test_failed_step_tip_names_the_recipe(run_cli, recipe):
    path = recipe("name: demo\nsteps:\n  bad: {kind: command, run: 'exit 1'}\n")
    r = run_cli("build", path, "--progress", "plain")
    assert f"tip: full log: snapbuild logs {path} bad" in r.err


def test_logs_of_a_warmup_point_to_its_checkpoint(run_cli, recipe):
    path = recipe("""
        name: demo
        steps:
          server: {kind: warmup, run: "sleep 60", ready: {tcp: "127.0.0.1:1"}}
          snap: {kind: checkpoint, process: server}
    """)
    r = run_cli("logs", path, "server")
    assert r.code == 6, r
    assert "runs, and logs, inside the step that checkpoints it" in r.err
    assert f"snapbuild logs {path} snap" in r.err


def test_sign_refuses_what_an_unverified_cache_gave_unless_told(run_cli, project, recipe, tmp_path):
    path = make(project, recipe)
    cache = f"file://{tmp_path / 'cache'}"
    assert run_cli("build", path, "--cache-to", cache, env={"SNAPBUILD_HOME": str(tmp_path / "other")}).code == 0
    r = run_cli("build", path, "--cache-from", cache, "--progress", "plain")
    assert r.code == 0 and f"warning: step join came from the remote cache {cache} without --cache-trust" in r.err, r
    assert run_cli("keygen", tmp_path / "ci.key").code == 0
    r = run_cli("sign", "demo:1", "--key", tmp_path / "ci.key")
    assert r.code == 10 and r.err.startswith("ERROR not signing demo:1") and f"join (from {cache})" in r.err, r
    assert "TIP" in r.err and "Traceback" not in r.err
    r = run_cli("sign", "demo:1", "--key", tmp_path / "ci.key", "--allow-untrusted-cache", "--json")
    assert r.code == 0 and "warning: signed anyway (--allow-untrusted-cache)" in r.err, r
    assert {s["name"] for s in r.json()["unverified_cache"]} == {"src", "up", "count", "join"}
    assert "--allow-untrusted-cache" in run_cli("sign", "--help").out
