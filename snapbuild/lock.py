"""The lock file: what every floating reference of a recipe resolved to.

Hub branches and tags (to commits and file hashes), S3 prefixes (to object versions
or ETags) and registry image tags (to image ids) float: the same recipe can mean other
bytes tomorrow. A successful build writes what they resolved to beside the recipe, in
``RECIPE.lock`` (``recipe.yaml`` -> ``recipe.lock``), one entry per matrix build and
step::

    {"version": 1, "builds": {"demo": {"model": {"source": "hf://acme/tiny@main",
                                                 "resolved": {"commit": "...", "files": {...}}}}}}

``snapbuild build --locked`` refuses to build when a reference resolves differently
from the lock file, and names the steps; ``snapbuild lock --update`` refreshes it.
Kinds with floating references provide ``lock_entry(spec, pins)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import SnapbuildError
from .store.fsutil import atomic_write

FORMAT = 1


class LockDrift(SnapbuildError):
    """A floating reference resolves differently from the lock file (``--locked``)."""

    exit_code = 3


def lock_path(recipe_path: str | Path) -> Path:
    return Path(recipe_path).with_suffix(".lock")


def entries(plan) -> dict:
    """``{step: {"source", "resolved"}}`` for the steps of a plan with floating references."""
    out = {}
    for name, planned in plan.steps.items():
        step = plan.recipe.steps[name]
        fn = getattr(step.kind, "lock_entry", None)
        entry = fn(step.spec, planned.material["pins"]) if fn else None
        if entry is not None:
            out[name] = entry
    return out


def read(recipe_path: str | Path) -> dict:
    path = lock_path(recipe_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": FORMAT, "builds": {}}
    except ValueError as e:
        raise SnapbuildError(f"{path} is not a valid lock file: {e}",
                             hint="regenerate it: snapbuild lock --update RECIPE") from None
    if data.get("version") != FORMAT:
        raise SnapbuildError(f"{path}: lock file version {data.get('version')!r}, this snapbuild reads {FORMAT}",
                             hint="regenerate it: snapbuild lock --update RECIPE")
    return data


def drift(recipe_path: str | Path, build_id: str, current: dict) -> list[str]:
    """How the current resolution differs from the lock file, one line per step."""
    locked = read(recipe_path)["builds"].get(build_id)
    if locked is None:
        return [f"{build_id}: not in {lock_path(recipe_path).name}"] if current else []
    out = []
    for step in sorted(set(locked) | set(current)):
        old, new = locked.get(step), current.get(step)
        if old == new:
            continue
        if old is None:
            out.append(f"{step}: not locked")
        elif new is None:
            out.append(f"{step}: locked, but the recipe no longer has a floating reference there")
        else:
            out.append(f"{step}: {new['source']} {_differs(old, new)}")
    return out


def _differs(old: dict, new: dict) -> str:
    if old.get("source") != new.get("source"):
        return f"(was {old.get('source')})"
    o, n = old.get("resolved", {}), new.get("resolved", {})
    if "commit" in o and o.get("commit") != n.get("commit"):
        return f"resolves to commit {str(n.get('commit'))[:12]}, locked {str(o.get('commit'))[:12]}"
    if "image_id" in o and o.get("image_id") != n.get("image_id"):
        return f"resolves to image {str(n.get('image_id'))[:19]}, locked {str(o.get('image_id'))[:19]}"
    files = sorted(p for p in set(o.get("files", {})) | set(n.get("files", {}))
                   if o.get("files", {}).get(p) != n.get("files", {}).get(p))
    return "files differ: " + ", ".join(files[:5]) if files else "resolves differently"


def check(recipe_path: str | Path, build_id: str, current: dict) -> None:
    lines = drift(recipe_path, build_id, current)
    if lines:
        raise LockDrift(f"{lock_path(recipe_path).name} does not match what the recipe resolves to now:\n  "
                        + "\n  ".join(lines),
                        hint="build without --locked, or refresh the lock file: snapbuild lock --update RECIPE")


def write(recipe_path: str | Path, resolved: dict[str, dict]) -> bool:
    """Record ``{build_id: entries}``; other builds' entries stay. True when it changed."""
    data = read(recipe_path)
    before = json.dumps(data, sort_keys=True)
    for build_id, ents in resolved.items():
        if ents:
            data["builds"][build_id] = ents
        else:
            data["builds"].pop(build_id, None)
    if json.dumps(data, sort_keys=True) == before or (not data["builds"] and not lock_path(recipe_path).exists()):
        return False
    atomic_write(lock_path(recipe_path), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return True
