#!/usr/bin/env python3
"""Benchmark the snapbuild CLI on a generated pipeline recipe (a script, not a pytest test).

    .venv/bin/python tests/bench/bench_pipeline.py               # 50 steps, 5 runs each
    .venv/bin/python tests/bench/bench_pipeline.py --steps 100 --runs 3
    .venv/bin/python tests/bench/bench_pipeline.py --json         # results as JSON

It writes, in a temporary folder, a recipe of ``--steps`` steps: a few ``files`` steps over
small generated source trees, and ``command`` steps in a layered DAG (parallel branches,
cross-branch joins, one final join) that each hash their inputs into a small output.
Then it times whole runs of the real CLI (process start-up included), wall-clock with
``time.perf_counter()`` around ``subprocess.run``:

    cli start-up   snapbuild --version
    plan, fresh    snapbuild plan RECIPE                         (empty store)
    build, full    snapbuild build RECIPE --progress none -j 2   (empty store)
    build, no-op   the same again (everything cached)
    plan, cached   snapbuild plan RECIPE                         (everything cached)

Every round uses a fresh ``SNAPBUILD_HOME`` and runs each measurement once (round-robin),
so machine noise spreads evenly over them instead of hitting one in a row. The median,
min and max over ``--runs`` rounds are reported, with the ratio full build / no-op and
the target (no-op rebuild under 1 s). The target is informational: exit status is 0
whether it is met or not; it is non-zero only if the CLI itself fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOOP_TARGET_S = 1.0
WIDTH = 4  # parallel branches in the command DAG
FILES_PER_TREE = 6

# (id, label) in the order a round runs them; the store state each needs is built up
# by the ones before it, so the order within a round is fixed.
MEASUREMENTS = [
    ("version", "cli start-up (--version)"),
    ("plan_fresh", "plan, fresh store"),
    ("build_full", "build, full (-j {jobs})"),
    ("build_noop", "build, no-op (all cached)"),
    ("plan_cached", "plan, all cached"),
]


# -- the CLI ----------------------------------------------------------------------------

def find_cli() -> tuple[list[str], dict]:
    """The ``snapbuild`` console script next to this interpreter, else ``python -m``."""
    exe = Path(sys.executable).parent / "snapbuild"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)], {}
    pp = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", "snapbuild.cli.main"], {"PYTHONPATH": pp}


class CliError(RuntimeError):
    pass


def run_cli(cli: list[str], args: list[str], env: dict) -> tuple[float, str]:
    """Run one CLI process; return (wall seconds, stdout). Raises CliError on failure."""
    t0 = time.perf_counter()
    proc = subprocess.run(cli + args, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise CliError(f"`snapbuild {' '.join(args)}` exited with status {proc.returncode}\n"
                       f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return dt, proc.stdout


# -- the recipe -------------------------------------------------------------------------

def make_recipe(root: Path, n_steps: int) -> dict:
    """Write sources and ``recipe.yaml`` under ``root``; return a description of the DAG."""
    n_files = max(1, min(5, n_steps // 10))
    n_work = n_steps - n_files - 1  # command steps before the final join
    width = min(WIDTH, n_work)
    srcs = [f"src{i}" for i in range(n_files)]

    for i, s in enumerate(srcs):
        base = root / "sources" / s
        (base / "data").mkdir(parents=True)
        (base / "__pycache__").mkdir()
        for j in range(FILES_PER_TREE):
            (base / f"mod{j}.py").write_text(
                f'"""module {j} of {s}."""\n\nVALUE = {i * 100 + j}\n\n'
                f"def f(x):\n    return x * {j + 1} + VALUE\n")
        (base / "data" / "table.csv").write_text("".join(f"{k},{k * k}\n" for k in range(50 + i)))
        (base / "__pycache__" / "mod0.cpython.pyc").write_bytes(b"\0excluded\0")
        (base / "notes.txt").write_text("not selected by include\n")

    steps: dict[str, list[str]] = {}
    layers = 0
    for i in range(n_work):
        layer, branch = divmod(i, width)
        layers = layer + 1
        name = f"l{layer:02d}b{branch}"
        if layer == 0:
            needs = [srcs[branch % n_files]]
            if branch % 2 and n_files > 1:
                needs.append(srcs[(branch + 1) % n_files])
        else:
            needs = [f"l{layer - 1:02d}b{branch}"]
            if layer % 3 == 2 and width > 1:  # cross-branch join
                needs.append(f"l{layer - 1:02d}b{(branch + 1) % width}")
            if layer % 4 == 1:  # read sources again mid-DAG
                needs.append(srcs[(layer + branch) % n_files])
        steps[name] = sorted(set(needs))
    used = {n for needs in steps.values() for n in needs}
    sinks = [n for n in steps if n not in used] or srcs
    steps["bundle"] = sinks

    out = [
        "# Generated by tests/bench/bench_pipeline.py",
        "name: bench",
        "description: Generated benchmark pipeline.",
        "vars:",
        '  version: "1.0"',
        "steps:",
    ]
    for s in srcs:
        out += [f"  {s}:", "    kind: files", f"    root: sources/{s}",
                '    include: ["*.py", "data/"]', '    exclude: ["__pycache__/"]']
    for name, needs in steps.items():
        joins = len(needs) > 1
        dest = '"$HOME/report"' if joins else '"$HOME/out.txt"'
        out += [f"  {name}:", "    kind: command", f"    needs: [{', '.join(needs)}]", "    run: |"]
        if joins:
            out += ['      mkdir -p "$HOME/report"', '      ls "$SNAPBUILD_INPUTS" > "$HOME/report/inputs.txt"']
            dest = '"$HOME/report/digests.txt"'
        out += ['      cd "$SNAPBUILD_INPUTS"',
                f'      echo "{name} {{{{ version }}}}" > {dest}',
                f"      find . -type f | LC_ALL=C sort | xargs sha256sum >> {dest}"]
        out += [f"    outputs: [{'report/' if joins else 'out.txt'}]"]
    out += ["publish:", '  tag: "bench:{{ version }}"', ""]
    path = root / "recipe.yaml"
    path.write_text("\n".join(out))
    n_joins = sum(len(v) > 1 for v in steps.values())
    return {"path": path, "steps": n_files + len(steps), "files_steps": n_files, "command_steps": len(steps),
            "layers": layers, "branches": width, "join_steps": n_joins}


# -- checks on what the CLI printed -----------------------------------------------------

_BUILD_LINE = re.compile(r"^\S+: (.+) in ([0-9.]+)s$", re.M)
_PLAN_LINE = re.compile(r"^\S+: (\d+) steps, (\d+) to run, (\d+) cached$", re.M)


def build_summary(stdout: str) -> tuple[dict, float | None]:
    m = _BUILD_LINE.search(stdout)
    if not m:
        return {}, None
    counts = {}
    for part in m.group(1).split(", "):
        n, _, status = part.partition(" ")
        if n.isdigit():
            counts[status] = int(n)
    return counts, float(m.group(2))


def check(mid: str, stdout: str, n_steps: int) -> str | None:
    """A problem with the CLI's output for measurement ``mid``, or None."""
    if mid in ("plan_fresh", "plan_cached"):
        m = _PLAN_LINE.search(stdout)
        if not m:
            return f"{mid}: no summary line in plan output"
        total, to_run = int(m.group(1)), int(m.group(2))
        want = n_steps if mid == "plan_fresh" else 0
        if total != n_steps or to_run != want:
            return f"{mid}: plan says {total} steps, {to_run} to run (expected {n_steps}, {want})"
    elif mid in ("build_full", "build_noop"):
        counts, _ = build_summary(stdout)
        if sum(counts.values()) != n_steps:
            return f"{mid}: build summary {counts} does not cover {n_steps} steps"
        cached = counts.get("cached", 0)
        if mid == "build_noop" and cached != n_steps:
            return f"{mid}: no-op rebuild was not fully cached: {counts}"
        if mid == "build_full" and cached:
            return f"{mid}: full build on a fresh store had cached steps: {counts}"
    return None


# -- the benchmark ----------------------------------------------------------------------

def bench(n_steps: int, runs: int, jobs: int) -> dict:
    cli, extra_env = find_cli()
    top = Path(tempfile.mkdtemp(prefix="snapbuild-bench-"))
    samples: dict[str, list[float]] = {mid: [] for mid, _ in MEASUREMENTS}
    in_cli: dict[str, list[float]] = {"build_full": [], "build_noop": []}
    problems: list[str] = []
    try:
        info = make_recipe(top / "project", n_steps)
        recipe = str(info["path"])
        base_env = {**os.environ, **extra_env}
        args = {
            "version": ["--version"],
            "plan_fresh": ["plan", recipe],
            "build_full": ["build", recipe, "--progress", "none", "-j", str(jobs)],
            "build_noop": ["build", recipe, "--progress", "none", "-j", str(jobs)],
            "plan_cached": ["plan", recipe],
        }
        # One untimed warm-up (imports, .pyc files, the OS file cache); its store is dropped.
        warm_home = top / "home-warmup"
        run_cli(cli, args["plan_fresh"], {**base_env, "SNAPBUILD_HOME": str(warm_home)})
        shutil.rmtree(warm_home, ignore_errors=True)
        for r in range(runs):
            home = top / f"home-{r}"
            env = {**base_env, "SNAPBUILD_HOME": str(home)}
            for mid, _ in MEASUREMENTS:
                dt, out = run_cli(cli, args[mid], env)
                samples[mid].append(dt)
                if mid in in_cli:
                    in_cli[mid].append(build_summary(out)[1])
                problem = check(mid, out, info["steps"])
                if problem and problem not in problems:
                    problems.append(problem)
            shutil.rmtree(home, ignore_errors=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)

    results = {}
    for mid, label in MEASUREMENTS:
        xs = samples[mid]
        results[mid] = {"label": label.format(jobs=jobs), "median_s": statistics.median(xs),
                        "min_s": min(xs), "max_s": max(xs), "samples_s": xs}
        if mid in in_cli and all(v is not None for v in in_cli[mid]):
            results[mid]["reported_by_cli_median_s"] = statistics.median(in_cli[mid])
    noop = results["build_noop"]["median_s"]
    return {
        "method": {
            "cli": cli, "cpus": os.cpu_count(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "platform": platform.platform(terse=True), "runs": runs, "jobs": jobs, "warmup_runs": 1,
            "timing": "wall-clock, time.perf_counter() around subprocess.run of one whole CLI process; "
                      "round-robin over the measurements; a fresh SNAPBUILD_HOME per round",
        },
        "recipe": {k: v for k, v in info.items() if k != "path"},
        "results": results,
        "ratio_full_over_noop": results["build_full"]["median_s"] / noop if noop else None,
        "target": {"what": "no-op rebuild median under 1 s", "limit_s": NOOP_TARGET_S,
                   "noop_median_s": noop, "met": noop < NOOP_TARGET_S},
        "problems": problems,
    }


def render(res: dict) -> str:
    m, rc = res["method"], res["recipe"]
    lines = [
        "snapbuild pipeline benchmark",
        f"  machine : {m['cpus']} CPUs, {m['python']}, {m['platform']}",
        f"  cli     : {' '.join(m['cli'])}",
        f"  recipe  : {rc['steps']} steps ({rc['files_steps']} files, {rc['command_steps']} command: "
        f"{rc['layers']} layers x {rc['branches']} branches, {rc['join_steps']} joins incl. the final one)",
        f"  method  : {m['runs']} runs each (+{m['warmup_runs']} untimed warm-up), median/min/max of wall-clock",
        "            seconds, time.perf_counter() around subprocess.run of the whole CLI process",
        "            (start-up included); round-robin over measurements, fresh SNAPBUILD_HOME per round",
        "",
    ]
    rows = [(r["label"], r["median_s"], r["min_s"], r["max_s"], r.get("reported_by_cli_median_s"))
            for r in res["results"].values()]
    w = max(len(r[0]) for r in rows)
    lines.append(f"  {'measurement'.ljust(w)}  {'median':>8}  {'min':>8}  {'max':>8}  {'in-CLI*':>8}")
    lines.append("  " + "-" * (w + 40))
    for label, med, lo, hi, inner in rows:
        extra = f"{inner:8.3f}" if inner is not None else f"{'':8}"
        lines.append(f"  {label.ljust(w)}  {med:8.3f}  {lo:8.3f}  {hi:8.3f}  {extra}")
    lines.append("  (seconds; *in-CLI = the duration `build` reports itself, median: step execution only,\n"
                 "   without start-up, recipe loading, planning or publishing)")
    lines.append("")
    ratio = res["ratio_full_over_noop"]
    lines.append(f"  full build / no-op rebuild: {ratio:.1f}x" if ratio else "  full build / no-op rebuild: n/a")
    t = res["target"]
    verdict = "PASS" if t["met"] else "MISS"
    lines.append(f"  target: no-op rebuild under {t['limit_s']:.1f} s -> {verdict} "
                 f"(median {t['noop_median_s']:.3f} s; informational)")
    for p in res["problems"]:
        lines.append(f"  WARNING {p}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="steps in the generated recipe (default 50, min 3)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default 5)")
    ap.add_argument("--jobs", "-j", type=int, default=2, help="`build -j` (default 2)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    a = ap.parse_args(argv)
    if a.steps < 3:
        ap.error("--steps must be at least 3")
    if a.runs < 1 or a.jobs < 1:
        ap.error("--runs and --jobs must be at least 1")
    try:
        res = bench(a.steps, a.runs, a.jobs)
    except CliError as e:
        print(f"bench_pipeline: the CLI failed: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if a.json else render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
