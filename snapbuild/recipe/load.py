"""Load a recipe file: parse, expand the matrix, template, validate, link the DAG.

Every error is a :class:`~snapbuild.errors.RecipeError` that names the file, line,
column and key path, and shows the offending line.
"""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path

import networkx as nx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import RecipeError, SnapbuildError, UsageError
from ..registry.ref import snapshot_ref
from ..steps import get_kind, kind_names
from ..steps.base import STEP_NAME_PATTERN
from .model import Recipe, Step
from .template import render_value
from .yamlloc import Located, load as load_yaml

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class _Publish(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tag: str | None = None
    steps: list[str] | None = None


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_NAME_RE.pattern)
    description: str | None = None
    vars: dict[str, object] = Field(default_factory=dict)
    matrix: dict[str, list[object]] = Field(default_factory=dict)
    steps: dict[str, object]  # each step is checked against its kind below
    publish: _Publish | None = None


def parse_sets(pairs: list[str] | tuple[str, ...]) -> dict:
    """``--set key=value`` pairs; values are read as YAML scalars (``8000`` is a number)."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"--set {pair!r}: expected NAME=VALUE with NAME a plain identifier",
                             hint="for example: --set port=8000")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def load_recipe(path: str | Path, sets: dict | None = None) -> list[Recipe]:
    """Load ``path`` and return one :class:`Recipe` per matrix combination."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} does not exist", file=str(path),
                          hint="pass the path of a recipe YAML file, e.g. recipes/examples/pipeline.yaml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read the recipe: {e}", file=str(path)) from None
    src = load_yaml(text, str(path))
    if not isinstance(src.data, dict):
        raise src.error((), "the recipe must be a mapping with `name:` and `steps:`")
    header = _validate(_Header, src.data, src, ())
    sets = dict(sets or {})

    matrix = dict(header.matrix)
    for k, values in matrix.items():
        if not values:
            raise src.error(("matrix", k), f"matrix {k!r} has no values")
        if k in sets:  # `--set model=x` picks one combination instead of adding a var
            matrix[k] = [sets.pop(k)]
    combos = [dict(zip(matrix, vals, strict=True)) for vals in itertools.product(*matrix.values())] or [{}]

    recipes = [_one(path, src, header, combo, sets) for combo in combos]
    if len(recipes) > 1:
        seen: dict[str, Recipe] = {}
        for r in recipes:
            if r.tag and r.tag in seen:
                raise src.error(("publish", "tag"),
                                f"matrix builds {seen[r.tag].build_id} and {r.build_id} publish the same tag {r.tag!r}",
                                hint="use a matrix variable in the tag, e.g. tag: \"app-{{ model }}:dev\"")
            if r.tag:
                seen[r.tag] = r
    return recipes


def _one(path: Path, src: Located, header: _Header, combo: dict, sets: dict) -> Recipe:
    ctx: dict = {}
    for k, v in header.vars.items():
        ctx[k] = sets[k] if k in sets else render_value(v, {**ctx, **combo, **sets}, src, ("vars", k))
    ctx.update(combo)
    ctx.update(sets)

    steps: dict[str, Step] = {}
    raw_steps = src.data["steps"]
    if not raw_steps:
        raise src.error(("steps",), "the recipe has no steps")
    for name, body in raw_steps.items():
        where = ("steps", name)
        if not re.match(STEP_NAME_PATTERN, name):
            raise src.error(where, f"step name {name!r} is not allowed", key=True,
                            hint="use letters, digits, '.', '_' and '-', starting with a letter or digit")
        if not isinstance(body, dict):
            raise src.error(where, "a step must be a mapping with at least `kind:`")
        if "kind" not in body:
            raise src.error(where, "the step has no `kind:`", hint=f"known kinds: {', '.join(kind_names())}")
        kind_name = body["kind"]
        if not isinstance(kind_name, str):
            raise src.error(where + ("kind",), f"`kind:` must be a name (got {kind_name!r})",
                            hint=f"known kinds: {', '.join(kind_names())}")
        try:
            kind = get_kind(kind_name)
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(kind_name), kind_names(), n=1)
            raise src.error(where + ("kind",), f"unknown step kind {kind_name!r}",
                            hint=(f"did you mean {close[0]!r}? " if close else "")
                            + f"known kinds: {', '.join(kind_names())}") from None
        rendered = render_value(body, ctx, src, where)
        spec = _validate(kind.Spec, rendered, src, where)
        steps[name] = Step(name=name, kind=kind, spec=spec, deps=[])

    graph = nx.DiGraph()
    graph.add_nodes_from(steps)
    for name, step in steps.items():
        refs = [(n, ("needs", i)) for i, n in enumerate(step.spec.needs)]
        refs += step.kind.references(step.spec)
        for target, keypath in refs:
            if target not in steps:
                close = difflib.get_close_matches(target, list(steps), n=1)
                raise src.error(("steps", name) + tuple(keypath), f"no step named {target!r}",
                                hint=(f"did you mean {close[0]!r}? " if close else "")
                                + f"steps in this recipe: {', '.join(steps)}")
            if target == name:
                raise src.error(("steps", name) + tuple(keypath), f"step {name!r} depends on itself")
            graph.add_edge(target, name)
        step.deps = sorted(graph.predecessors(name))
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        names = [a for a, _ in cycle]
        raise src.error(("steps", names[0]), "dependency cycle: " + " -> ".join(names + [names[0]]),
                        key=True, hint="remove one of these references (needs:, process:, ...) to break the cycle")

    publish = header.publish or _Publish()
    tag = render_value(publish.tag, ctx, src, ("publish", "tag")) if publish.tag else None
    if tag:
        try:
            snapshot_ref(tag, header.name)
        except SnapbuildError as e:
            raise src.error(("publish", "tag"), e.message, hint=e.hint) from None
    publish_steps = publish.steps or sorted(n for n in steps if graph.out_degree(n) == 0)
    for i, n in enumerate(publish_steps):
        if n not in steps:
            raise src.error(("publish", "steps", i), f"no step named {n!r}",
                            hint=f"steps in this recipe: {', '.join(steps)}")
    _check_processes(steps, graph, publish_steps, publish.steps is not None, src)
    return Recipe(name=header.name, path=path.resolve(), steps=steps, graph=graph, vars=ctx,
                  variant=combo, tag=tag, publish_steps=list(publish_steps), source=src)


def _check_processes(steps: dict[str, Step], graph: nx.DiGraph, publish_steps: list[str], explicit: bool,
                     src: Located) -> None:
    """A live process (an ephemeral step such as ``warmup``) has no artifact: only a
    checkpoint's ``process:`` may take it, and only a non-ephemeral step may take that."""
    for name, step in steps.items():
        for target, keypath in step.kind.references(step.spec):
            if keypath and keypath[0] == "process" and not steps[target].kind.ephemeral:
                raise src.error(("steps", name) + tuple(keypath),
                                f"`process: {target}` must name a warmup step, not a {steps[target].kind.name} step",
                                hint="a checkpoint dumps the live server that a `kind: warmup` step starts")
        for i, dep in enumerate(step.spec.needs):
            if steps[dep].kind.ephemeral:
                raise src.error(("steps", name, "needs", i),
                                f"step {dep!r} is a live {steps[dep].kind.name} process, not a file tree: "
                                "it cannot be an input",
                                hint=f"checkpoint it with `kind: checkpoint, process: {dep}` and use that step")
    for name, step in steps.items():
        check = getattr(step.kind, "check_links", None)
        problem = check(step.spec, steps) if check else None
        if problem:
            keypath, message, hint = problem
            raise src.error(("steps", name) + tuple(keypath), message, hint=hint)
    for i, n in enumerate(publish_steps):
        if steps[n].kind.ephemeral:
            where = ("publish", "steps", i) if explicit else ("steps", n)
            raise src.error(where, f"step {n!r} is a live {steps[n].kind.name} process: a process cannot be "
                                   "published" + ("" if explicit else ", and nothing checkpoints it"),
                            key=not explicit,
                            hint=f"add a step `snap: {{kind: checkpoint, process: {n}}}` and publish that")
    for name, step in steps.items():
        if step.kind.ephemeral and not any(True for _ in graph.successors(name)):
            raise src.error(("steps", name), f"step {name!r} is a live {step.kind.name} process that nothing "
                                             "checkpoints", key=True,
                            hint=f"add a step `snap: {{kind: checkpoint, process: {name}}}`")


def _validate(model: type[BaseModel], data, src: Located, where: tuple):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _pydantic_error(e, model, data, src, where) from None


def _pydantic_error(e: ValidationError, model, data, src: Located, where: tuple) -> RecipeError:
    # An unknown key usually explains the rest (a typo'd `rn:` is also a missing `run:`).
    errors = sorted(e.errors(include_url=False), key=lambda x: x["type"] != "extra_forbidden")
    err = errors[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = where + loc
    etype = err["type"]
    if etype == "extra_forbidden":
        bad = str(loc[-1])
        fields = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(bad, fields, n=1)
        hint = (f"did you mean {close[0]!r}? " if close else "") + (f"allowed keys: {', '.join(fields)}" if fields else "")
        return src.error(path, f"unknown key {bad!r}", key=True, hint=hint or None)
    if etype == "missing":
        return src.error(path[:-1], f"missing required key {loc[-1]!r}")
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if etype == "value_error" or isinstance(got, (dict, list)):
        got_s = ""
    else:
        got_s = f" (got {'nothing' if got is None else f'{type(got).__name__} {got!r}'})"
    if etype == "string_pattern_mismatch" and path == ("name",):
        return src.error(path, f"recipe name {got!r} is not allowed",
                         hint="use lower-case letters, digits, '.', '_' and '-' (it becomes part of tags and paths)")
    return src.error(path, f"{msg}{got_s}")


def _fields_at(model, loc: tuple) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into, for suggestions."""
    for part in loc:
        if isinstance(part, int):
            continue
        f = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        ann = getattr(f, "annotation", None)
        sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)
