"""The executor: parallel branches, failure handling, statuses and logs."""

from __future__ import annotations

from snapbuild.build import build
from snapbuild.exec.report import PlainReporter, RecordingReporter
from snapbuild.logs import step_log

# `left` and `right` each wait for the other to have started: they can only both
# succeed if they really run at the same time.
PARALLEL = """
name: par
vars: {{sync: "{sync}"}}
steps:
  left:
    kind: command
    run: touch {{{{ sync }}}}/left; for i in $(seq 100); do test -e {{{{ sync }}}}/right && break; sleep 0.05; done; test -e {{{{ sync }}}}/right
    outputs: []
  right:
    kind: command
    run: touch {{{{ sync }}}}/right; for i in $(seq 100); do test -e {{{{ sync }}}}/left && break; sleep 0.05; done; test -e {{{{ sync }}}}/left
  join: {{kind: command, needs: [left, right], run: "true"}}
"""


def test_independent_steps_run_in_parallel(recipe, store, tmp_path):
    path = recipe(PARALLEL.format(sync=tmp_path))
    [res] = build(path, store=store, jobs=2)
    assert res.ok, {n: r.error for n, r in res.steps.items()}
    assert [r.status for r in res.steps.values()] == ["built"] * 3


def test_one_job_runs_one_step_at_a_time(recipe, store, tmp_path):
    path = recipe(PARALLEL.format(sync=tmp_path).replace("seq 100", "seq 4"))
    [res] = build(path, store=store, jobs=1)
    assert not res.ok, "with -j1 the two waiting steps cannot meet"


FAILING = """
name: fail
steps:
  bad: {kind: command, run: "echo about to fail; echo details >&2; exit 3"}
  child: {kind: command, needs: [bad], run: "true"}
  grandchild: {kind: command, needs: [child], run: "true"}
  slow: {kind: command, run: "sleep 0.5"}
  after_slow: {kind: command, needs: [slow], run: "true"}
"""


def test_failure_skips_descendants_and_stops_by_default(recipe, store):
    rep = RecordingReporter()
    [res] = build(recipe(FAILING), store=store, jobs=2, reporter=rep)
    st = {n: r.status for n, r in res.steps.items()}
    assert st["bad"] == "failed"
    assert st["child"] == st["grandchild"] == "skipped"
    assert "needs bad, which failed" in res.steps["child"].reason
    assert st["slow"] == "built", "a step already running finishes"
    assert st["after_slow"] == "skipped" and "--keep-going" in res.steps["after_slow"].reason
    assert res.snapshot is None and res.failed == ["bad"]
    bad = res.steps["bad"]
    assert bad.error == "command exited with status 3"
    assert "about to fail" in bad.log_tail and "details" in bad.log_tail
    assert ("failed", "bad") in rep.events and ("start", "child") not in rep.events


def test_keep_going_finishes_other_branches(recipe, store):
    [res] = build(recipe(FAILING), store=store, jobs=2, keep_going=True)
    st = {n: r.status for n, r in res.steps.items()}
    assert st == {"bad": "failed", "child": "skipped", "grandchild": "skipped",
                  "slow": "built", "after_slow": "built"}
    # The next build reruns only what failed or never ran.
    [again] = build(recipe(FAILING), store=store, jobs=2, keep_going=True)
    assert again.steps["slow"].status == again.steps["after_slow"].status == "cached"


def test_failed_step_log_is_kept(recipe, store):
    path = recipe(FAILING)
    build(path, store=store)
    assert "about to fail" in step_log(path, "bad", store=store)


def test_missing_output_fails_the_step(recipe, store):
    [res] = build(recipe("name: d\nsteps:\n  s: {kind: command, run: 'true', outputs: [nothere.txt]}\n"), store=store)
    assert res.steps["s"].status == "failed" and "'nothere.txt' was not produced" in res.steps["s"].error


def test_timeout_kills_the_command(recipe, store):
    [res] = build(recipe("name: d\nsteps:\n  s: {kind: command, run: 'sleep 30', timeout: 0.3}\n"), store=store)
    assert res.steps["s"].status == "failed" and "timed out" in res.steps["s"].error


def test_inputs_are_readable_and_env_is_fixed(recipe, store, project, monkeypatch):
    (project / "data.txt").write_text("payload")
    monkeypatch.setenv("LEAKY", "should not be seen")
    path = recipe("""
        name: d
        steps:
          src: {kind: files, include: [data.txt]}
          use:
            kind: command
            needs: [src]
            env: {GREETING: hi}
            run: |
              cat "$SNAPBUILD_INPUTS/src/data.txt" > out.txt
              echo "$GREETING ${LEAKY:-unset} ${SNAPBUILD_STEP:-noname}" >> out.txt
            outputs: [out.txt]
    """)
    [res] = build(path, store=store)
    assert res.ok
    from snapbuild.store.tree import load_tree, materialize

    out = project / "got"
    materialize(store.blobs, load_tree(store.blobs, res.steps["use"].artifact), out)
    assert (out / "out.txt").read_text() == "payloadhi unset noname\n"


def test_plain_reporter_lines(recipe, store, tmp_path):
    import io

    buf = io.StringIO()
    build(recipe(FAILING), store=store, reporter=PlainReporter(buf))
    text = buf.getvalue()
    assert "build fail: 5 steps, 5 to run, 0 cached" in text
    assert "failed  bad" in text and "    | about to fail" in text


def test_steps_doing_the_same_work_share_one_entry(recipe, store):
    path = recipe("""
        name: d
        steps:
          first: {kind: command, run: "echo same > out", outputs: [out]}
          second: {kind: command, run: "echo same > out", outputs: [out]}
    """)
    [res] = build(path, store=store, jobs=2)
    assert res.ok and res.steps["first"].key == res.steps["second"].key
    assert res.steps["first"].artifact == res.steps["second"].artifact


def test_step_hint_reaches_the_plain_output(recipe, store):
    import io

    buf = io.StringIO()
    build(recipe("name: d\nsteps:\n  s: {kind: command, run: 'true', pass_env: [NOT_SET_ANYWHERE]}\n"),
          store=store, reporter=PlainReporter(buf))
    assert "tip: export them before running snapbuild" in buf.getvalue()


def test_inputs_are_shared_and_in_place_writes_are_caught(recipe, store, project):
    (project / "data.txt").write_text("original")
    path = recipe("""
        name: d
        steps:
          src: {kind: files, include: [data.txt]}
          copy:
            kind: command
            needs: [src]
            run: cp -r "$SNAPBUILD_INPUTS/src" mine; echo changed > mine/data.txt; cat "$SNAPBUILD_INPUTS/src/data.txt" > seen
            outputs: [seen]
          vandal:
            kind: command
            needs: [copy]
            run: echo oops >> "$SNAPBUILD_INPUTS/copy/seen"
    """)
    [res] = build(path, store=store, jobs=1)
    assert res.steps["copy"].status == "built", "cp -r of an input gives a private copy"
    assert res.steps["vandal"].status == "failed"
    assert "modified its input copy/seen in place" in res.steps["vandal"].error
    # The shared copy was discarded: the next reader sees the true content.
    path.write_text(path.read_text().split("  vandal:")[0] + """  reader:
    kind: command
    needs: [copy]
    run: cp "$SNAPBUILD_INPUTS/copy/seen" out
    outputs: [out]
""")
    [again] = build(path, store=store)
    from snapbuild.store.tree import load_tree, materialize

    assert again.ok, {n: r.error for n, r in again.steps.items()}
    materialize(store.blobs, load_tree(store.blobs, again.steps["reader"].artifact), project / "got")
    assert (project / "got" / "out").read_text() == "original"


def test_many_tiny_parallel_steps_never_race_on_the_statuses(recipe, tmp_path):
    """Workers used to read the shared statuses while the scheduler added to them
    ("dictionary changed size during iteration"). A tiny switch interval makes the
    threads interleave inside such a loop, every few bytecodes."""
    import sys

    from snapbuild.store import Store

    n = 300
    path = recipe("name: many\nsteps:\n" + "".join(f"  s{i}: {{kind: files, root: src, include: [f{i}]}}\n"
                                                    for i in range(n)))
    (path.parent / "src").mkdir()
    for i in range(n):
        (path.parent / "src" / f"f{i}").write_text(str(i))
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for round_ in range(2):  # a fresh store each round: every step runs
            [res] = build(path, store=Store(tmp_path / f"home{round_}"), jobs=8)
            assert res.ok, {name: r.error for name, r in res.steps.items() if r.error}
    finally:
        sys.setswitchinterval(old)
