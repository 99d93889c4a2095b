"""Cache keys depend on content and spec, never on times or where things are; the
plan says why a step runs."""

from __future__ import annotations

import os
import shutil

from snapbuild.build import build, plan
from snapbuild.plan import why_changed

RECIPE = """
name: demo
vars: {msg: hi}
steps:
  src: {kind: files, include: ["*.txt"], description: "the sources"}
  a:
    kind: command
    needs: [src]
    run: cat "$SNAPBUILD_INPUTS/src/in.txt" > out.txt; echo {{ msg }} >> out.txt
    outputs: [out.txt]
  b: {kind: command, run: "echo b > b.txt", outputs: [b.txt]}
"""


def keys(path, store, sets=None):
    [p] = plan(path, sets=sets, store=store)
    return {n: s.key for n, s in p.steps.items()}


def actions(path, store, sets=None):
    [p] = plan(path, sets=sets, store=store)
    return {n: (s.action, s.reason) for n, s in p.steps.items()}


def setup(project, recipe):
    (project / "in.txt").write_text("one\n")
    return recipe(RECIPE)


def test_keys_do_not_depend_on_location_or_mtime(project, recipe, store, tmp_path):
    path = setup(project, recipe)
    before = keys(path, store)
    os.utime(project / "in.txt", (1, 1))
    assert keys(path, store) == before
    moved = shutil.copytree(project, tmp_path / "elsewhere" / "deeper")
    assert keys(moved / "recipe.yaml", store) == before


def test_content_mode_spec_and_vars_change_keys(project, recipe, store):
    path = setup(project, recipe)
    k0 = keys(path, store)
    (project / "in.txt").write_text("two\n")
    k1 = keys(path, store)
    assert k1["src"] != k0["src"] and k1["a"] != k0["a"], "a new input key must change its consumer"
    assert k1["b"] == k0["b"], "an unrelated step keeps its key"
    os.chmod(project / "in.txt", 0o755)
    assert keys(path, store)["src"] != k1["src"]
    assert keys(path, store, {"msg": "bye"})["a"] != k1["a"]


def test_keyless_fields_keep_the_key(project, recipe, store):
    path = setup(project, recipe)
    k0 = keys(path, store)
    path.write_text(path.read_text().replace('description: "the sources"', 'description: "other words"')
                    .replace('"echo b > b.txt"', '"echo b > b.txt", timeout: 30'))
    assert keys(path, store) == k0


def test_pass_env_values_never_reach_the_key(project, recipe, store, monkeypatch):
    path = recipe("""
        name: demo
        steps:
          s: {kind: command, run: 'test -n "$TOKEN"', pass_env: [TOKEN]}
    """)
    monkeypatch.setenv("TOKEN", "secret-1")
    k1 = keys(path, store)
    monkeypatch.setenv("TOKEN", "secret-2")
    assert keys(path, store) == k1
    [p] = plan(path, store=store)
    assert "secret" not in str(p.steps["s"].material)


def test_plan_reasons(project, recipe, store):
    path = setup(project, recipe)
    assert {n: r for n, (_, r) in actions(path, store).items()} == {
        "src": "never built", "a": "never built", "b": "never built"}
    [res] = build(path, store=store)
    assert res.ok
    assert {a for a, _ in actions(path, store).values()} == {"cached"}

    (project / "in.txt").write_text("changed\n")
    (project / "new.txt").write_text("new\n")
    got = actions(path, store)
    assert got["src"] == ("run", "files changed: in.txt; added: new.txt")
    assert got["a"] == ("run", "input src changed")
    assert got["b"][0] == "cached"

    path.write_text(path.read_text().replace("echo b > b.txt", "echo bb > b.txt"))
    assert actions(path, store)["b"] == ("run", "spec.run changed")


def test_reason_after_cache_entry_lost(project, recipe, store):
    path = setup(project, recipe)
    [res] = build(path, store=store)
    ref_file = store.home / "refs" / "steps" / f"{res.steps['b'].key}.json"
    ref_file.unlink()
    assert actions(path, store)["b"] == ("run", "not in the cache (removed by gc or verify --repair, or never stored)")


def test_why_changed_orders_fields():
    base = {"kind": "command", "version": 1, "spec": {"run": "a", "env": {}}, "pins": {}, "inputs": {"x": "1"}}
    assert why_changed(None, base) == "never built"
    assert why_changed({**base, "version": 0}, base) == "command step format changed (v0 -> v1)"
    assert why_changed({**base, "spec": {"run": "b", "env": {}}}, base) == "spec.run changed"
    assert why_changed({**base, "inputs": {}}, base) == "new input x"
    assert why_changed({**base, "inputs": {"x": "1", "y": "2"}}, base) == "input y removed"
    many = {"files": {f"f{i}": "1" for i in range(5)}}
    changed = {"files": {f"f{i}": "2" for i in range(5)}}
    assert why_changed({**base, "pins": many}, {**base, "pins": changed}) == \
        "files changed: f0, f1, f2 (+2 more)"
