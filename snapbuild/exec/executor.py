"""Run a plan: topological order, independent steps in parallel, failures as values.

All reporter calls happen on the calling thread, so reporters need no locking. A
failed step marks its descendants ``skipped``; without ``keep_going`` no new step
starts after a failure (running ones finish), with it the other branches go on.
"""

from __future__ import annotations

import shutil
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from ..errors import SnapbuildError, StepError
from ..plan import Plan, PlannedStep
from ..steps import BuildContext
from ..store import StepRef, Store
from .report import NullReporter, Reporter

BUILT, CACHED, FAILED, SKIPPED = "built", "cached", "failed", "skipped"


@dataclass
class StepResult:
    name: str
    kind: str
    key: str
    status: str
    reason: str = ""  # why it ran, or why it was skipped
    duration_s: float = 0.0
    artifact: str | None = None
    error: str | None = None
    hint: str | None = None
    log_tail: str | None = None
    culprit: str | None = None  # another step at fault (StepError.step)
    exit_code: int | None = None  # of a failure: the error's (7 for a source that cannot be reached)

    def to_json(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "key": self.key, "status": self.status,
               "duration_s": round(self.duration_s, 3)}
        if self.reason:
            out["reason"] = self.reason
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class BuildResult:
    build_id: str
    steps: dict[str, StepResult] = field(default_factory=dict)
    snapshot: str | None = None
    tag: str | None = None
    registry: str | None = None
    pushed: list[dict] = field(default_factory=list)  # one report per --push registry
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [n for n, r in self.steps.items() if r.status == FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed and all(r.status in (BUILT, CACHED) for r in self.steps.values())

    def to_json(self) -> dict:
        out = {"steps": [r.to_json() for r in self.steps.values()], "snapshot": self.snapshot}
        if self.warnings:
            out["warnings"] = list(self.warnings)
        if self.tag:
            out["tag"] = self.tag
        if self.pushed:
            out["pushed"] = self.pushed
        return out


def execute(plan: Plan, store: Store, *, jobs: int = 1, keep_going: bool = False,
            reporter: Reporter | None = None) -> BuildResult:
    reporter = reporter or NullReporter()
    recipe = plan.recipe
    result = BuildResult(build_id=recipe.build_id)
    t_start = time.monotonic()
    statuses = result.steps

    for name, ps in plan.steps.items():
        if ps.action == "cached" and recipe.steps[name].kind.ephemeral:
            statuses[name] = StepResult(name, ps.kind, ps.key, CACHED)
        elif ps.action == "cached":
            statuses[name] = StepResult(name, ps.kind, ps.key, CACHED, artifact=ps.artifact, reason=ps.reason or None)
            store.touch_ref(ps.key)
            _record_state(store, recipe.build_id, ps, CACHED)

    remaining = [n for n, ps in plan.steps.items() if ps.action == "run"]
    cancel = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="step") as pool:
        running: dict[Future, str] = {}
        try:
            first_failure = _schedule(plan, store, pool, running, remaining, statuses, jobs,
                                      keep_going, reporter, cancel)
        except BaseException:
            # Ctrl-C or SIGTERM: stop the running commands and let their threads finish
            # recording the failure; nothing half-written becomes visible.
            cancel.set()
            wait(running)
            raise
    for name in remaining:  # only after a failure without --keep-going
        ps = plan.steps[name]
        bad = next((d for d in recipe.steps[name].deps if statuses[d].status in (FAILED, SKIPPED)), None)
        reason = (f"needs {bad}, which {statuses[bad].status}" if bad else
                  f"build stopped after {first_failure} failed (use --keep-going to continue other steps)")
        statuses[name] = StepResult(name, ps.kind, ps.key, SKIPPED, reason=reason)
        reporter.step_done(statuses[name])
    # A warm-up that failed inside its checkpoint is reported as the failed step too.
    for res in list(statuses.values()):
        if res.status == FAILED and res.culprit and res.culprit in statuses:
            c = statuses[res.culprit]
            statuses[res.culprit] = StepResult(c.name, c.kind, c.key, FAILED, reason=c.reason, error=res.error,
                                               hint=res.hint, log_tail=res.log_tail)
            reporter.step_done(statuses[res.culprit])
    # Report steps in plan order, whatever order they finished in.
    result.steps = {n: statuses[n] for n in plan.steps}
    result.duration_s = time.monotonic() - t_start
    return result


def _schedule(plan: Plan, store: Store, pool: ThreadPoolExecutor, running: dict[Future, str],
              remaining: list[str], statuses: dict[str, StepResult], jobs: int, keep_going: bool,
              reporter: Reporter, cancel: threading.Event) -> str | None:
    """Start every step whose inputs are ready, until nothing is left or a failure stops
    the build. Returns the first failed step, if any; ``remaining`` keeps what never ran."""
    recipe = plan.recipe
    first_failure: str | None = None
    while True:
        if first_failure is None or keep_going:
            for name in list(remaining):
                deps = recipe.steps[name].deps
                bad = next((d for d in deps if d in statuses and statuses[d].status in (FAILED, SKIPPED)), None)
                ps = plan.steps[name]
                if bad is not None:
                    remaining.remove(name)
                    statuses[name] = StepResult(name, ps.kind, ps.key, SKIPPED,
                                                reason=f"needs {bad}, which {statuses[bad].status}")
                    reporter.step_done(statuses[name])
                elif recipe.steps[name].kind.ephemeral and all(d in statuses for d in deps):
                    # Nothing to do on its own: its consumer starts the process.
                    remaining.remove(name)
                    statuses[name] = StepResult(name, ps.kind, ps.key, BUILT, reason=ps.reason)
                elif len(running) < jobs and all(d in statuses for d in deps):
                    remaining.remove(name)
                    reporter.step_started(ps)
                    # A copy, taken here: this thread adds to ``statuses`` while the step runs.
                    running[pool.submit(_run_step, plan, ps, store, dict(statuses), cancel)] = name
        if not running:
            return first_failure
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for fut in done:
            name = running.pop(fut)
            statuses[name] = fut.result()
            reporter.step_done(statuses[name])
            if statuses[name].status == FAILED and first_failure is None:
                first_failure = name


def _run_step(plan: Plan, ps: PlannedStep, store: Store, statuses: dict[str, StepResult],
              cancel: threading.Event) -> StepResult:
    """Run one step on a worker thread. ``statuses`` is the worker's own copy of the
    steps finished when it started (every input among them)."""
    recipe = plan.recipe
    step = recipe.steps[ps.name]
    with store.building(ps.key):
        # Another build on this store may have produced it while we waited for the lock.
        ref = store.get_ref(ps.key)
        if ref is not None and store.is_complete(ref):
            _record_state(store, recipe.build_id, ps, CACHED)
            return StepResult(ps.name, ps.kind, ps.key, CACHED, reason="built meanwhile by another step or build with the same key",
                              artifact=ref.artifact)
        scratch = store.scratch(f"log-{ps.name}")
        log_path = scratch / "step.log"
        t0 = time.monotonic()
        try:
            with open(log_path, "w") as log:
                ctx = BuildContext(name=ps.name, key=ps.key, store=store, base_dir=recipe.base_dir,
                                   log=log, log_path=log_path,
                                   inputs={d: statuses[d].artifact for d in step.deps},
                                   pins=ps.material["pins"], cancel=cancel, recipe=recipe,
                                   artifacts={n: r.artifact for n, r in statuses.items()},
                                   input_keys=dict(ps.material["inputs"]), offline=plan.offline)
                try:
                    artifact = step.kind.build(step.spec, ctx)
                except StepError as e:
                    log.flush()
                    res = _failed(store, recipe.build_id, ps, log_path, t0, e.message, e.hint, e.log_tail)
                    res.culprit = e.step
                    res.exit_code = e.exit_code
                    return res
                except SnapbuildError as e:
                    log.write(f"\n{e.message}\n")
                    log.flush()
                    return _failed(store, recipe.build_id, ps, log_path, t0, e.message, e.hint, None)
                except Exception as e:  # a bug in a kind must not take the whole build down
                    log.write("\n" + traceback.format_exc())
                    log.flush()
                    return _failed(store, recipe.build_id, ps, log_path, t0,
                                   f"internal error in {ps.kind} step: {e!r}", "this is a bug; the log has the traceback", None)
            duration = time.monotonic() - t0
            store.put_log(ps.key, log_path)
            store.put_ref(StepRef(key=ps.key, artifact=artifact, name=ps.name, kind=ps.kind, duration_s=duration))
            _record_state(store, recipe.build_id, ps, BUILT)
            return StepResult(ps.name, ps.kind, ps.key, BUILT, reason=ps.reason, duration_s=duration,
                              artifact=artifact)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _failed(store: Store, build_id: str, ps: PlannedStep, log_path, t0: float, message: str,
            hint: str | None, log_tail: str | None) -> StepResult:
    store.put_log(ps.key, log_path)
    _record_state(store, build_id, ps, FAILED)
    return StepResult(ps.name, ps.kind, ps.key, FAILED, reason=ps.reason,
                      duration_s=time.monotonic() - t0, error=message, hint=hint, log_tail=log_tail)


def _record_state(store: Store, build_id: str, ps: PlannedStep, status: str) -> None:
    """What the step was last built from (for `plan`'s why) and its last attempt (for
    `logs`). Written only when it changes, so a no-op rebuild writes nothing."""
    state = store.get_state(build_id, ps.name) or {}
    new = dict(state)
    if status != FAILED:
        new.update(key=ps.key, material=ps.material)
    if not (status == CACHED and state.get("last_key") == ps.key):  # same key: same log
        new.update(last_key=ps.key, last_status=status)
    if new != state:
        store.put_state(build_id, ps.name, new)
