"""``command``: a shell command in a fresh work folder; declared outputs become the artifact.

```yaml
compile:
  kind: command
  needs: [src]
  run: |
    cp -r "$SNAPBUILD_INPUTS/src" .
    python3 -m compileall -q src
  outputs: [src/]
  env: {PYTHONHASHSEED: "0"}
  pass_env: [HTTPS_PROXY, "PIP_*"]  # values come from the caller and stay out of the key
  timeout: 600
```

Inputs are hard-linked from a per-store cache of written-out trees: reading them is
free, writing to one in place fails the step (write a new file instead).

The command runs under ``bash -euo pipefail -c`` with a small, fixed environment:
``PATH``, ``HOME`` (the work folder), ``LANG``, ``TMPDIR``, ``SNAPBUILD_INPUTS``,
the spec's ``env`` and the names in ``pass_env``. A build that reads nothing but its
inputs and spec is then reproducible and safely cached. (The step's name is
deliberately not given: it is not part of the key, so two steps that do the same
work share one cache entry.)
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator

from ..errors import StepError
from ..tools import OrphanGuard
from ..runtime.trees import discard, ensure_tree, link_farm, modified
from ..store.tree import build_tree, walk
from .base import BuildContext, PinContext, StepSpec

LOG_TAIL_LINES = 20
POLL_S = 0.05  # how quickly a timeout or an interrupt stops the command


class CommandSpec(StepSpec):
    run: str
    outputs: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    pass_env: list[str] = Field(default_factory=list)
    timeout: float | None = Field(default=None, gt=0)

    # A timeout changes no output; pass_env values are secrets by assumption (the
    # names stay in the key through key_fields below).
    KEYLESS: ClassVar[frozenset[str]] = StepSpec.KEYLESS | {"timeout"}

    @field_validator("outputs")
    @classmethod
    def _relative(cls, v: list[str]) -> list[str]:
        for p in v:
            if p.startswith("/") or ".." in Path(p).parts:
                raise ValueError(f"output {p!r} must be a path inside the work folder")
        return v


def passed_env(names: list[str]) -> dict[str, str]:
    """The caller's values for ``pass_env``: plain names must be set; glob patterns
    (``PIP_*``) pass whichever matching variables are set, possibly none."""
    out: dict[str, str] = {}
    missing = []
    for name in names:
        if any(c in name for c in "*?["):
            out.update({k: v for k, v in os.environ.items() if fnmatch.fnmatchcase(k, name)})
        elif name in os.environ:
            out[name] = os.environ[name]
        else:
            missing.append(name)
    if missing:
        raise StepError(f"pass_env names variables that are not set: {', '.join(missing)}",
                        hint="export them before running snapbuild, drop them from pass_env, "
                             "or use a pattern such as PIP_* (matches zero or more)")
    return out


def tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except OSError:
        return ""


class CommandStep:
    name = "command"
    version = 1
    Spec = CommandSpec
    ephemeral = False

    def references(self, spec):
        return []

    def pins(self, spec: CommandSpec, ctx: PinContext) -> dict:
        return {}

    def build(self, spec: CommandSpec, ctx: BuildContext) -> str:
        scratch = ctx.store.scratch(ctx.name)
        try:
            return self._build(spec, ctx, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _build(self, spec: CommandSpec, ctx: BuildContext, scratch: Path) -> str:
        inputs, work, tmp = scratch / "inputs", scratch / "work", scratch / "tmp"
        for d in (inputs, work, tmp):
            d.mkdir()
        # Each input is written out once per store and hard-linked into this step's
        # folder: a step that reads 1 GB of dependencies starts in a fraction of a second.
        shared: dict[str, tuple[Path, dict]] = {}
        for name in spec.needs:
            tree, _ = ensure_tree(ctx.store.blobs, ctx.inputs[name], ctx.store.home / "cache")
            shared[name] = (tree, link_farm(tree, inputs / name))
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(work),
            "LANG": "C.UTF-8",
            "TMPDIR": str(tmp),
            "SNAPBUILD_INPUTS": str(inputs),
        }
        env.update(passed_env(spec.pass_env))
        env.update(spec.env)

        ctx.log.write(f"$ {spec.run}\n")
        ctx.log.flush()
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", spec.run], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=ctx.log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        guard = OrphanGuard(proc.pid)  # a build killed with SIGKILL takes its command with it
        deadline = time.monotonic() + spec.timeout if spec.timeout else None
        try:
            while True:
                try:
                    rc = proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if ctx.cancel.is_set():
                    _kill_group(proc)
                    raise StepError("interrupted", log_tail=tail(ctx.log_path))
                if deadline is not None and time.monotonic() > deadline:
                    _kill_group(proc)
                    raise StepError(f"command timed out after {spec.timeout:g} s", log_tail=tail(ctx.log_path),
                                    hint="raise `timeout:` or make the command faster")
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            guard.release()
        for name, (tree, sigs) in shared.items():
            changed = modified(sigs)
            if changed:
                discard(tree)  # written out afresh for the next step that needs it
                rel = os.path.relpath(changed[0], tree)
                raise StepError(f"the command modified its input {name}/{rel} in place"
                                + (f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""),
                                hint="inputs are shared and read-only: copy a file before changing it "
                                     "(cp, or write a new file and rename it over the old one)")
        if rc != 0:
            recipe = ctx.recipe.path if ctx.recipe is not None else "RECIPE"
            raise StepError(f"command exited with status {rc}", log_tail=tail(ctx.log_path),
                            hint=f"full log: snapbuild logs {recipe} {ctx.name}")

        items: list[tuple[str, Path]] = []
        for pattern in spec.outputs:
            matches = sorted(work.glob(pattern.rstrip("/"))) if pattern.rstrip("/") else []
            if not matches:
                raise StepError(f"output {pattern!r} was not produced by the command",
                                log_tail=tail(ctx.log_path),
                                hint="outputs are paths relative to the work folder the command runs in")
            for m in matches:
                rel = m.relative_to(work).as_posix()
                items.append((rel, m))
                if m.is_dir() and not m.is_symlink():
                    items.extend((f"{rel}/{r}", p) for r, p in walk(m))
        digest, tree = build_tree(ctx.store.blobs, items)
        ctx.log.write(f"stored {len(tree['entries'])} output entries\n")
        return digest


def _kill_group(proc: subprocess.Popen) -> None:
    # The command runs in its own session (so a timeout kills everything it started);
    # kill that whole group, not just bash.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
