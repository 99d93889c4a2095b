"""Loading recipes: templating, matrix, and errors that point at file:line:column."""

from __future__ import annotations

import pytest

from snapbuild.errors import RecipeError
from snapbuild.recipe import load_recipe, parse_sets


def load_error(path, sets=None) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, sets)
    return info.value


def test_loads_steps_edges_and_templates(recipe, project):
    (project / "a.txt").write_text("x")
    path = recipe("""
        name: demo
        vars: {greeting: hello, who: "{{ greeting }} world"}
        steps:
          src: {kind: files, include: ["*.txt"]}
          say:
            kind: command
            needs: [src]
            run: echo {{ who }}
            outputs: [out.txt]
        publish: {tag: "demo:{{ greeting }}"}
    """)
    [r] = load_recipe(path)
    assert r.name == "demo"
    assert r.steps["say"].spec.run == "echo hello world"
    assert r.steps["say"].deps == ["src"]
    assert r.order() == ["src", "say"]
    assert r.tag == "demo:hello"
    assert r.publish_steps == ["say"]  # the step nothing depends on


def test_set_overrides_vars_with_yaml_types(recipe):
    path = recipe("""
        name: demo
        vars: {port: 8000}
        steps:
          s: {kind: command, run: "serve {{ port + 1 }}", timeout: "{{ port }}"}
    """)
    [r] = load_recipe(path, parse_sets(["port=9000"]))
    assert r.steps["s"].spec.run == "serve 9001"
    assert r.steps["s"].spec.timeout == 9000.0


def test_matrix_expands_and_set_picks_one(recipe):
    path = recipe("""
        name: demo
        matrix: {model: [small, large], target: [cpu]}
        steps:
          s: {kind: command, run: "train {{ model }} on {{ target }}"}
        publish: {tag: "demo-{{ model }}:dev"}
    """)
    rs = load_recipe(path)
    assert [r.steps["s"].spec.run for r in rs] == ["train small on cpu", "train large on cpu"]
    assert [r.build_id for r in rs] == ["demo[model=small,target=cpu]", "demo[model=large,target=cpu]"]
    [only] = load_recipe(path, {"model": "large"})
    assert only.steps["s"].spec.run == "train large on cpu"


def test_matrix_with_one_tag_for_all_builds_is_an_error(recipe):
    path = recipe("""
        name: demo
        matrix: {model: [a, b]}
        steps:
          s: {kind: command, run: "x {{ model }}"}
        publish: {tag: "demo:dev"}
    """)
    e = load_error(path)
    assert "publish the same tag" in e.message and e.line == 5
    assert "matrix variable" in e.hint


def test_unknown_key_names_line_column_and_suggests(recipe):
    path = recipe("""
        name: demo
        steps:
          build:
            kind: command
            rn: make
    """)
    e = load_error(path)
    assert (e.line, e.column) == (5, 5)
    assert e.key_path == ("steps", "build", "rn")
    assert "unknown key 'rn'" in e.message
    assert "did you mean 'run'" in e.hint
    rendered = e.render()
    assert f"{path}:5:5: steps -> build -> rn" in rendered
    assert "    5 |     rn: make" in rendered
    assert rendered.splitlines()[-1].endswith("    ^")


def test_unknown_top_level_key(recipe):
    e = load_error(recipe("name: demo\nstep: {}\n"))
    assert e.line == 2 and "did you mean 'steps'" in e.hint


def test_wrong_type(recipe):
    path = recipe("""
        name: demo
        steps:
          s:
            kind: command
            run: x
            outputs: out.txt
    """)
    e = load_error(path)
    assert e.key_path == ("steps", "s", "outputs") and e.line == 6 and e.column == 14
    assert "valid list" in e.message and "out.txt" in e.message


def test_unknown_kind_suggests(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  s: {kind: comand, run: x}\n"))
    assert "unknown step kind 'comand'" in e.message and "did you mean 'command'" in e.hint
    assert e.line == 3 and e.key_path == ("steps", "s", "kind")


def test_reference_to_missing_step(recipe):
    path = recipe("""
        name: demo
        steps:
          src: {kind: command, run: x}
          b:
            kind: command
            run: y
            needs: [src, sorc]
    """)
    e = load_error(path)
    assert "no step named 'sorc'" in e.message and "did you mean 'src'" in e.hint
    assert e.key_path == ("steps", "b", "needs", 1) and e.line == 7


def test_cycle_names_every_step(recipe):
    path = recipe("""
        name: demo
        steps:
          a: {kind: command, run: x, needs: [c]}
          b: {kind: command, run: x, needs: [a]}
          c: {kind: command, run: x, needs: [b]}
          d: {kind: command, run: x}
    """)
    e = load_error(path)
    assert "dependency cycle" in e.message
    cycle = e.message.split(": ", 1)[1].split(" -> ")
    assert set(cycle) == {"a", "b", "c"} and cycle[0] == cycle[-1] and len(cycle) == 4


def test_self_reference(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  a: {kind: command, run: x, needs: [a]}\n"))
    assert "depends on itself" in e.message


def test_undefined_template_variable(recipe):
    path = recipe("""
        name: demo
        vars: {port: 1}
        steps:
          s:
            kind: command
            run: serve {{ prot }}
    """)
    e = load_error(path)
    assert e.line == 6 and e.key_path == ("steps", "s", "run")
    assert "'prot' is undefined" in e.message and "--set" in e.hint and "port" in e.hint


def test_template_default_filter_and_sandbox(recipe):
    path = recipe("""
        name: demo
        steps:
          s: {kind: command, run: "v={{ git_sha | default('dev') }}"}
          t: {kind: command, run: "{{ ''.__class__.__mro__ }}"}
    """)
    e = load_error(path)  # the sandbox refuses attribute access to internals
    assert e.key_path == ("steps", "t", "run")
    [r] = load_recipe(path.parent / _strip_t(path))
    assert r.steps["s"].spec.run == "v=dev"


def _strip_t(path):
    text = "\n".join(line for line in path.read_text().splitlines() if "  t:" not in line)
    out = path.with_name("no_t.yaml")
    out.write_text(text)
    return out.name


def test_template_syntax_error(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  s: {kind: command, run: 'x {{ a b'}\n"))
    assert e.line == 3 and "template syntax error" in e.message


def test_yaml_syntax_error_has_line(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  s: {kind: command\n  t: 1\n"))
    assert "YAML syntax error" in e.message and e.line in (3, 4)


def test_duplicate_key(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  s: {kind: command, run: a}\n  s: {kind: command, run: b}\n"))
    assert "duplicate key 's'" in e.message and e.line == 4 and "line 3" in e.hint


def test_missing_file_and_empty_recipe(project, recipe):
    e = load_error(project / "nope.yaml")
    assert "does not exist" in e.message
    e = load_error(recipe(""))
    assert "empty" in e.message


def test_missing_required_key(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  s:\n    kind: command\n"))
    assert "missing required key 'run'" in e.message and e.line == 4


def test_bad_names(recipe):
    e = load_error(recipe("name: Demo App\nsteps:\n  s: {kind: command, run: a}\n"))
    assert e.key_path == ("name",) and "not allowed" in e.message
    e = load_error(recipe("name: demo\nsteps:\n  'a b': {kind: command, run: a}\n"))
    assert "step name 'a b'" in e.message and e.line == 3


def test_publish_steps_must_exist(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  s: {kind: command, run: a}\npublish: {steps: [t]}\n"))
    assert e.key_path == ("publish", "steps", 0) and "no step named 't'" in e.message


def test_parse_sets_rejects_malformed():
    from snapbuild.errors import UsageError

    for bad in (["novalue"], ["1x=2"]):
        with pytest.raises(UsageError):
            parse_sets(bad)
    assert parse_sets(["a=1", "b=x y", "c="]) == {"a": 1, "b": "x y", "c": ""}


def test_kind_must_be_a_name(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  s: {kind: [files]}\n"))
    assert "must be a name (got ['files'])" in e.message and e.key_path == ("steps", "s", "kind")


def test_unresolvable_pins_point_at_the_step(recipe, store):
    from snapbuild.build import plan

    path = recipe("name: demo\nsteps:\n  src: {kind: files, root: nowhere}\n")
    with pytest.raises(RecipeError) as info:
        plan(path, store=store)
    e = info.value
    assert e.line == 3 and e.key_path == ("steps", "src") and "is not a folder" in e.message
    assert "relative to the recipe's folder" in e.hint


def test_bad_publish_tag_is_found_before_any_build(recipe):
    e = load_error(recipe("name: demo\nvars: {v: ''}\nsteps:\n  s: {kind: command, run: a}\npublish: {tag: 'demo:{{ v }}'}\n"))
    assert e.key_path == ("publish", "tag") and e.line == 5 and "tag '' in 'demo:' is not valid" in e.message


def test_friendly_messages_for_empty_step_and_bad_output(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  s:\n"))
    assert "a step must be a mapping" in e.message and e.line == 3
    e = load_error(recipe("name: demo\nsteps:\n  s: {kind: command, run: a, outputs: [../x]}\n"))
    assert e.message == "output '../x' must be a path inside the work folder"


WARM = ("name: demo\n"
        "steps:\n"
        "  server: {kind: warmup, run: serve, ready: {tcp: \"127.0.0.1:8000\"}}\n")


@pytest.mark.parametrize("rest, where, message", [
    ("  snap: {kind: checkpoint, process: other}\n  other: {kind: command, run: x}\n",
     "steps -> snap -> process:", "`process: other` must name a warmup step, not a command step"),
    ("  snap: {kind: checkpoint, process: server}\n  use: {kind: command, needs: [server], run: x}\n",
     "steps -> use -> needs -> 0:", "step 'server' is a live warmup process, not a file tree"),
    ("  snap: {kind: checkpoint, process: server}\npublish: {steps: [snap, server]}\n",
     "publish -> steps -> 1:", "step 'server' is a live warmup process: a process cannot be published"),
    ("", "steps -> server:", "step 'server' is a live warmup process: a process cannot be published, and "
     "nothing checkpoints it"),
    ("  other: {kind: command, run: x}\npublish: {steps: [other]}\n",
     "steps -> server:", "step 'server' is a live warmup process that nothing checkpoints"),
])
def test_live_processes_are_only_taken_by_checkpoints(recipe, rest, where, message):
    e = load_error(recipe(WARM + rest))
    assert message in e.message, e.message
    assert where in str(e), str(e)


@pytest.mark.parametrize("server, snap, where, message", [
    ("{kind: warmup, run: serve, ready: {tcp: \"127.0.0.1:1\"}}", "{kind: checkpoint, process: server, engine: runc}",
     "steps -> snap -> engine:", "engine runc runs the server in a container, but warm-up 'server' has no `image:`"),
    ("{kind: warmup, image: img, run: serve, ready: {tcp: \"127.0.0.1:1\"}}", "{kind: checkpoint, process: server}",
     "steps -> snap -> engine:", "warm-up 'server' runs in image 'img', which needs a container engine, not host"),
    ("{kind: warmup, run: serve, ready: {tcp: \"127.0.0.1:1\"}}",
     "{kind: checkpoint, process: server, runsc: {direct: true}}",
     "steps -> snap:", "`runsc:` options need engine: runsc (this checkpoint uses host)"),
    ("{kind: warmup, mounts: {/w: img}, run: serve, ready: {tcp: \"127.0.0.1:1\"}}",
     "{kind: checkpoint, process: server}",
     "steps -> server -> mounts -> /w:", "`img` (kind: image) is not a folder: only the output of a files"),
    ("{kind: warmup, mounts: {/usr: img}, run: serve, ready: {tcp: \"127.0.0.1:1\"}}",
     "{kind: checkpoint, process: server}",
     "steps -> server:", "mount point '/usr' would cover a system path"),
    ("{kind: warmup, mounts: {models/x: img}, run: serve, ready: {tcp: \"127.0.0.1:1\"}}",
     "{kind: checkpoint, process: server}",
     "steps -> server:", "mount point 'models/x' must be an absolute path"),
    ("{kind: warmup, image: img, run: serve, ready: {file: /ready}}", "{kind: checkpoint, process: server, engine: runc}",
     "steps -> server:", "a `file` probe checks a path on this machine, not in the container"),
])

def test_engines_and_warmups_must_agree(recipe, server, snap, where, message):
    e = load_error(recipe("name: demo\nsteps:\n  img: {kind: image, from: \"rootfs:x.tar\"}\n"
                          f"  server: {server}\n  snap: {snap}\npublish: {{steps: [snap, img]}}\n"))
    assert message in e.message, e.message
    assert where in str(e), str(e)


def test_an_image_must_come_from_an_image_step(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  src: {kind: command, run: x}\n"
                          "  img: {kind: image, from: src}\n"))
    assert "`from: src` names a command step, not an image step" in e.message
    assert "steps -> img -> from:" in str(e)


def test_image_keys_use_the_keys_as_written_and_not_the_base_files_path():
    from snapbuild.steps.image import ImageSpec

    a = ImageSpec.model_validate({"kind": "image", "from": "rootfs:/one/place/base.tar", "copy": {"a": "/a"}})
    b = ImageSpec.model_validate({"kind": "image", "from": "rootfs:../elsewhere/base.tar", "copy": {"a": "/a"}})
    assert a.key_fields() == b.key_fields()
    assert a.key_fields()["from"] == "rootfs:" and a.key_fields()["copy"] == {"a": "/a"}
    c = ImageSpec.model_validate({"kind": "image", "from": "base"})
    assert c.key_fields()["from"] == "base"


def test_a_warmup_image_must_be_an_image_step(recipe):
    e = load_error(recipe("name: demo\nsteps:\n  src: {kind: command, run: x}\n"
                          "  server: {kind: warmup, image: src, run: serve, ready: {tcp: \"127.0.0.1:1\"}}\n"
                          "  snap: {kind: checkpoint, process: server, engine: runc}\n"))
    assert "warm-up 'server': `image: src` names a command step, not an image step" in e.message
