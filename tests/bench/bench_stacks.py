#!/usr/bin/env python3
"""Real server stacks from PyPI, cold boot against restore (a script, not a pytest test).

    .venv/bin/python tests/bench/bench_stacks.py              # every stack, 5 runs per mode
    .venv/bin/python tests/bench/bench_stacks.py --runs 3 --stacks uvicorn-workers zmq-engine
    .venv/bin/python tests/bench/bench_stacks.py --json

Each stack is built from its example recipe (recipes/examples/) into a fresh
``SNAPBUILD_HOME`` in a temporary folder, then measured with ``snapbuild bench``'s
own loop (snapbuild/runner/bench.py): cold and restore alternated, each timed from the
runner's start to a passing readiness probe, then one POST /infer compared across
modes, with the page cache warm (and dropped, as root). Printed: stack, engine,
processes in the tree, checkpoint MiB (memory pages), cold and restore medians,
speedup (ratio of medians), whether every answer was identical, and how the restored
servers answered the recipe's check requests (`verify:`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "recipes" / "examples"
STACKS = {  # name: (recipe, --set values, tag)
    "uvicorn-workers": ("uvicorn-workers.yaml", {}, "uvicorn-workers:dev"),
    "gunicorn-sync": ("gunicorn-preload.yaml", {"worker_class": "sync"}, "gunicorn-preload-sync:dev"),
    "gunicorn-gthread": ("gunicorn-preload.yaml", {"worker_class": "gthread"}, "gunicorn-preload-gthread:dev"),
    "zmq-engine": ("zmq-engine.yaml", {}, "zmq-engine:dev"),
    "hypercorn-workers": ("hypercorn-workers.yaml", {}, "hypercorn-workers:dev"),
    "aiohttp-gunicorn": ("aiohttp-gunicorn.yaml", {}, "aiohttp-gunicorn:dev"),
    "torch-mp-workers": ("torch-mp-workers.yaml", {}, "torch-mp-workers:dev"),
    "uvicorn-transformers": ("uvicorn-transformers.yaml", {}, "uvicorn-transformers:dev"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--stacks", nargs="*", default=sorted(STACKS), choices=sorted(STACKS))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="snapbuild-bench-stacks-"))
    os.environ["SNAPBUILD_HOME"] = str(work / "home")
    os.environ.setdefault("SNAPBUILD_RUN_ROOT", str(work / "run-root"))
    from snapbuild.build import build
    from snapbuild.runner.bench import bench
    from snapbuild.runner.pull import pull
    from snapbuild.store import Store

    shutil.copytree(EXAMPLES / "stacks", work / "stacks")
    rows = []
    try:
        for name in a.stacks:
            recipe, sets, tag = STACKS[name]
            shutil.copy(EXAMPLES / recipe, work)
            store = Store()
            [res] = build(work / recipe, store=store, sets=sets)
            if not res.ok:
                raise SystemExit(f"{name}: build failed: " + "; ".join(f"{n}: {r.error}" for n, r in res.steps.items()
                                                                       if r.error))
            runtime = pull(tag, store=store)["snapshot"].runtime
            r = bench(tag, runs=a.runs, store=store, progress=lambda m, n=name: print(f"  {n}: {m}", file=sys.stderr))
            rows.append({"stack": name, "engine": runtime.engine, "processes": len(runtime.pids),
                         "checkpoint_mib": round((r["checkpoint_bytes"] or 0) / 2**20, 1),
                         "cold_s": r["cold_s"], "restore_s": r["restore_s"], "speedup": r["speedup"],
                         "answers_same": r["answers"].get("same"), "checks": r.get("verify"),
                         "dropped": r.get("page_cache_dropped")})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if a.json:
        print(json.dumps({"runs": a.runs, "stacks": rows}, indent=2))
        return
    print(f"{a.runs} runs per mode, alternated; seconds from runner start to ready; medians, page cache warm "
          "(and, as root, dropped before every run)")
    print(f"{'stack':<21} {'engine':<6} {'procs':>5} {'ckpt MiB':>8} {'cold s':>7} {'restore s':>9} "
          f"{'speedup':>7} {'dropped':>8}  answers same      verify")
    for x in rows:
        dropped = f"{x['dropped']['speedup']:.1f}x" if x["dropped"] else "-"
        print(f"{x['stack']:<21} {x['engine']:<6} {x['processes']:>5} {x['checkpoint_mib']:>8} {x['cold_s']:>7.3f} "
              f"{x['restore_s']:>9.3f} {x['speedup']:>6.1f}x {dropped:>8}  "
              f"{ {True: 'yes', False: 'NO'}.get(x['answers_same'], 'not compared'):<17}  "
              + (", ".join(f"{n} {how}" for how, n in sorted(x["checks"].items())) if x["checks"] else "-"))

if __name__ == "__main__":
    main()
