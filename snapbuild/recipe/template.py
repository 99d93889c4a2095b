"""Jinja2 templating of recipe values: sandboxed, and strict about undefined names.

Only string values that contain ``{{`` or ``{%`` are rendered, one at a time, after the
YAML is parsed; a template error therefore points at the exact value that holds it.
"""

from __future__ import annotations

from functools import lru_cache

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from .yamlloc import Located


@lru_cache(maxsize=1)
def _env() -> SandboxedEnvironment:
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                keep_trailing_newline=True)


def is_template(value) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def render_value(value, ctx: dict, src: Located, path: tuple):
    """Render every template string inside ``value`` (dicts and lists recursively)."""
    if isinstance(value, dict):
        return {k: render_value(v, ctx, src, path + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, ctx, src, path + (i,)) for i, v in enumerate(value)]
    if not is_template(value):
        return value
    try:
        return _env().from_string(value).render(ctx)
    except jinja2.UndefinedError as e:
        known = ", ".join(sorted(ctx)) or "none"
        raise src.error(path, f"template error: {e.message}",
                        hint=f"define it under `vars:` or pass `--set NAME=VALUE` "
                             f"(defined: {known}); use `{{{{ x | default('...') }}}}` for optional values") from None
    except jinja2.TemplateSyntaxError as e:
        raise src.error(path, f"template syntax error: {e.message}") from None
    except jinja2.TemplateError as e:
        raise src.error(path, f"template error: {e}") from None
