"""The plan: for every step its key, and whether it runs or comes from the cache (and why)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import SnapbuildError, SourceUnreachable, StepError
from ..recipe import Recipe
from ..steps import PinContext
from ..store import Store
from .keys import key_material, key_of, short, why_changed


@dataclass
class PlannedStep:
    name: str
    kind: str
    key: str
    material: dict
    action: str  # "run" | "cached"
    reason: str  # why it runs ("" when cached)
    artifact: str | None = None  # tree digest when cached

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "key": self.key, "action": self.action,
                "reason": self.reason or None}

    @property
    def short_key(self) -> str:
        return short(self.key)


@dataclass
class Plan:
    recipe: Recipe
    steps: dict[str, PlannedStep]  # in topological order
    offline: bool = False  # planned from the lock file; its steps reach no network source

    @property
    def to_run(self) -> list[str]:
        return [n for n, s in self.steps.items() if s.action == "run"]

    def to_json(self) -> dict:
        return {"steps": [s.to_json() for s in self.steps.values()]}


class PlanError(SnapbuildError):
    """A step's pins could not be resolved (missing files, unreachable source...)."""

    exit_code = 3


def make_plan(recipe: Recipe, store: Store, *, offline: bool = False, locked: dict | None = None,
              lock_file: str = "RECIPE.lock") -> Plan:
    """``offline``: floating references come from ``locked`` (this build's entries of
    the lock file named ``lock_file``), not from their sources."""
    base = PinContext(base_dir=recipe.base_dir, store=store, offline=offline, lock_file=lock_file)
    planned: dict[str, PlannedStep] = {}
    for name in recipe.order():
        step = recipe.steps[name]
        ctx = replace(base, step=name, locked=(locked or {}).get(name))
        try:
            pins = step.kind.pins(step.spec, ctx)
        except SourceUnreachable as e:  # not the recipe's fault: exits 7, like an unreachable registry
            raise SourceUnreachable(f"step {name!r}: {e.message}", hint=e.hint) from None
        except StepError as e:
            if recipe.source is not None:  # point at the step in the recipe, like any recipe error
                raise recipe.source.error(("steps", name), e.message, key=True, hint=e.hint) from None
            raise PlanError(f"step {name!r}: {e.message}", hint=e.hint) from None
        material = key_material(step.kind, step.spec, pins, {d: planned[d].key for d in step.deps})
        key = key_of(material)
        if step.kind.ephemeral:  # decided below, once its consumers are planned
            planned[name] = PlannedStep(name, step.kind.name, key, material, "cached", "")
            continue
        ref = store.get_ref(key)
        if ref is not None and store.is_complete(ref):
            planned[name] = PlannedStep(name, step.kind.name, key, material, "cached", "", ref.artifact)
        else:
            state = store.get_state(recipe.build_id, name)
            old = state.get("material") if state else None
            reason = why_changed(old, material)
            planned[name] = PlannedStep(name, step.kind.name, key, material, "run", reason)
    # An ephemeral step (a live process) runs exactly when a consumer has to be built.
    for name in reversed(list(planned)):
        if recipe.steps[name].kind.ephemeral:
            users = sorted(n for n in recipe.graph.successors(name) if planned[n].action == "run")
            if users:
                planned[name].action = "run"
                planned[name].reason = f"needed by {', '.join(users)}"
    return Plan(recipe=recipe, steps=planned, offline=offline)
