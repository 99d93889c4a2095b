"""Finding a step's log: the last attempt of that step in that recipe's build."""

from __future__ import annotations

from pathlib import Path

from .errors import NotFound
from .recipe import load_recipe
from .store import Store


def step_log(recipe_path: str | Path, step: str, *, sets: dict | None = None, store: Store | None = None) -> str:
    store = store or Store()
    recipes = load_recipe(recipe_path, sets)
    out = []
    for r in recipes:
        if step not in r.steps:
            raise NotFound(f"recipe {r.name} has no step {step!r}", hint=f"steps: {', '.join(r.steps)}")
        if r.steps[step].kind.ephemeral:  # a warm-up runs inside its checkpoint, and logs there
            consumers = sorted(r.graph.successors(step))
            raise NotFound(f"step {step!r} is a {r.steps[step].kind.name} process: it runs, and logs, inside "
                           f"the step that checkpoints it",
                           hint="see " + (" or ".join(f"snapbuild logs {recipe_path} {c}" for c in consumers)
                                          or "the checkpoint step's log"))
        state = store.get_state(r.build_id, step) or {}
        key = state.get("last_key")
        path = store.log_path(key) if key else None
        if not path or not path.exists():
            raise NotFound(f"no log for step {step!r} of {r.build_id}: it has not run with this store",
                           hint=f"build it first: snapbuild build {recipe_path}")
        header = f"== {r.build_id} / {step} ({state.get('last_status')}, key {key[:12]}) ==\n"
        out.append((header if len(recipes) > 1 else "") + path.read_text(errors="replace"))
    return "".join(out)
