#!/usr/bin/env python3
"""Side-by-side restores of one host-process snapshot: is the k-th as fast as the first?

    python tests/bench/bench_replicas.py [--replicas 4] [--runs 3] [--recipe recipes/examples/torch-mlp.yaml] [--json]

The recipe (default: the torch reference workload, ~400 MB of weights in anonymous
memory) is copied with ``isolation: namespaces`` added to its checkpoint step and built
into a temporary store. Then, ``--runs`` times: restore it once, then again and again
while the earlier replicas keep running (each with ``--publish 0``, its own port),
until ``--replicas`` run side by side; every replica must answer ``POST /infer`` with
the first's digest. Each restore is ``snapbuild-runner restore`` in a subprocess (the runner's
own ``timings.total_s``, and the wall time of the command), on a warm node: the
snapshot is in the store and its images written out once, as after a first restore.
Reports the median per k and its ratio to k = 1. Needs root and CRIU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def infer(address: str) -> str:
    """The answer's ``digest`` (of the model's output for a fixed input; the rest of the
    answer counts calls)."""
    req = urllib.request.Request(f"http://{address}/infer", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["digest"]


def isolated_copy(recipe: Path, into: Path) -> Path:
    """The recipe and its folder, with ``isolation: namespaces`` on the checkpoint step."""
    for item in recipe.parent.iterdir():
        if item.is_dir():
            shutil.copytree(item, into / item.name, symlinks=True)
    text = recipe.read_text()
    marker = "    kind: checkpoint\n"
    if marker not in text:
        raise SystemExit(f"{recipe}: no `kind: checkpoint` step written as this script expects")
    out = into / recipe.name
    out.write_text(text.replace(marker, marker + "    isolation: namespaces\n", 1))
    return out


def restore(tag: str, env: dict) -> tuple[dict, float]:
    t = time.monotonic()
    r = subprocess.run([str(BIN / "snapbuild-runner"), "restore", tag, "--publish", "0", "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    wall = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(f"restore failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "examples" / "torch-mlp.yaml")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    images = Path(tempfile.mkdtemp(prefix="bench-replicas-images-", dir="/dev/shm"))  # tmpfs, as on a node
    env = {**os.environ, "SNAPBUILD_HOME": str(work / "home"), "SNAPBUILD_RUN_ROOT": str(work / "run-root"),
           "SNAPBUILD_IMAGE_CACHE": str(images)}
    os.environ.update(env)
    from snapbuild.build import build
    from snapbuild.runner.restore import stop
    from snapbuild.store import Store

    recipe = isolated_copy(a.recipe, work)
    t = time.monotonic()
    [res] = build(recipe, store=Store(work / "home"), jobs=2)
    if not res.ok:
        raise SystemExit({n: (r.error, r.log_tail) for n, r in res.steps.items() if r.error})
    tag = res.tag
    print(f"built {tag} with isolation: namespaces in {time.monotonic() - t:.1f}s", file=sys.stderr)
    first, _ = restore(tag, env)  # writes the images out: the node is warm from here on
    want = infer(first["address"])
    stop(first["pid"])
    totals: dict[int, list[float]] = {k: [] for k in range(1, a.replicas + 1)}
    walls: dict[int, list[float]] = {k: [] for k in range(1, a.replicas + 1)}
    phases: dict[int, list[dict]] = {k: [] for k in range(1, a.replicas + 1)}
    try:
        for run in range(a.runs):
            running = []
            try:
                for k in range(1, a.replicas + 1):
                    out, wall = restore(tag, env)
                    running.append(out)
                    if out["mode"] != "restore":
                        raise SystemExit(f"replica {k} booted cold: {out['reason']}")
                    if infer(out["address"]) != want:
                        raise SystemExit(f"replica {k} answered otherwise than the first")
                    totals[k].append(out["timings"]["total_s"])
                    walls[k].append(wall)
                    phases[k].append(out["timings"])
                    print(f"run {run + 1} replica {k}: {out['timings']['total_s']:.3f}s (command {wall:.3f}s)",
                          file=sys.stderr)
                for out in running:  # all still answering, side by side
                    if infer(out["address"]) != want:
                        raise SystemExit("a replica stopped answering like the first")
            finally:
                for out in running:
                    stop(out["pid"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)
    rows = []
    base = statistics.median(totals[1])
    for k in totals:
        med = statistics.median(totals[k])
        names = sorted({n for t in phases[k] for n in t if n.endswith("_s") and n != "total_s"})
        rows.append({"k": k, "restore_s": round(med, 3), "command_s": round(statistics.median(walls[k]), 3),
                     "ratio_to_first": round(med / base, 2),
                     "phases": {n: round(statistics.median(t.get(n, 0) for t in phases[k]), 3) for n in names}})
    if a.json:
        print(json.dumps({"recipe": str(a.recipe), "runs": a.runs, "rows": rows}, indent=2))
        return
    print(f"{tag}: the k-th restore while k-1 replicas run; medians of {a.runs} runs")
    print(f"  {'k':>2} {'restore (runner)':>17} {'command':>9} {'x first':>8}")
    for r in rows:
        print(f"  {r['k']:>2} {r['restore_s']:>16.3f}s {r['command_s']:>8.3f}s {r['ratio_to_first']:>7.2f}x  "
              + " ".join(f"{n[:-2]}={v:.3f}" for n, v in r["phases"].items()))


if __name__ == "__main__":
    main()
