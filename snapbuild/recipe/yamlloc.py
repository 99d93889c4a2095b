"""YAML to plain Python values, keeping where every key and value came from.

PyYAML's composer gives nodes with marks; this module turns them into dicts, lists and
scalars and records a :class:`Loc` for each key path, so any later check (schema,
references, templates) can point at ``file:line:column`` with the offending line.
Templating happens after this, value by value, which is why line numbers stay true.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from ..errors import RecipeError

try:  # the C loader composes several times faster
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _Loader = yaml.SafeLoader


@dataclass(frozen=True)
class Loc:
    line: int  # 1-based
    column: int  # 1-based


class Located:
    """Parsed YAML plus the location of every key (``keys``) and value (``values``)."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines = text.splitlines()
        self.values: dict[tuple, Loc] = {}
        self.keys: dict[tuple, Loc] = {}
        self.data = None

    def loc(self, path: tuple, *, key: bool = False) -> Loc | None:
        """The location of ``path``, falling back to its nearest located parent."""
        path = tuple(path)
        while True:
            table = self.keys if key else self.values
            if path in table:
                return table[path]
            if key and path in self.values:
                return self.values[path]
            if not path:
                return None
            path = path[:-1]
            key = False

    def error(self, path: tuple, message: str, *, key: bool = False, hint: str | None = None,
              loc: Loc | None = None) -> RecipeError:
        loc = loc or self.loc(path, key=key)
        line = loc.line if loc else None
        src = self.lines[line - 1] if line and line <= len(self.lines) else None
        return RecipeError(message, file=self.file, line=line, column=loc.column if loc else None,
                           key_path=path, source_line=src, hint=hint)


def _mark(node) -> Loc:
    return Loc(node.start_mark.line + 1, node.start_mark.column + 1)


def load(text: str, file: str) -> Located:
    out = Located(file, text)
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = Loc(mark.line + 1, mark.column + 1) if mark else None
        msg = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise out.error((), f"YAML syntax error: {msg}", loc=loc,
                        hint="check indentation and quoting on or just above this line") from None
    except yaml.YAMLError as e:
        raise out.error((), f"YAML error: {e}") from None
    if node is None:
        raise out.error((), "the recipe is empty", hint="a recipe needs at least `name:` and `steps:`")
    constructor = yaml.SafeLoader("")
    out.data = _build(node, (), out, constructor)
    return out


def _build(node, path: tuple, out: Located, constructor):
    out.values[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        result = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                raise out.error(path, "YAML merge keys (<<) are not supported", loc=_mark(knode),
                                hint="repeat the keys, or use `vars:` and templates")
            if not isinstance(knode, yaml.ScalarNode):
                raise out.error(path, "mapping keys must be plain strings", loc=_mark(knode))
            key = constructor.construct_object(knode)
            if not isinstance(key, str):
                key = str(key)
            if key in result:
                raise out.error(path + (key,), f"duplicate key {key!r}", loc=_mark(knode),
                                hint=f"{key!r} was already given at line {out.keys[path + (key,)].line}")
            out.keys[path + (key,)] = _mark(knode)
            result[key] = _build(vnode, path + (key,), out, constructor)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(v, path + (i,), out, constructor) for i, v in enumerate(node.value)]
    return constructor.construct_object(node)
