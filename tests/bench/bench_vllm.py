#!/usr/bin/env python3
"""The real vLLM (recipes/examples/vllm-cpu.yaml): cold boot, restore on a node that has
the snapshot, restore on an empty node from a local OCI registry, and the first answer
of each; medians of --runs, the restores' phases from the runner's timings.

    python tests/bench/bench_vllm.py [--ref vllm-cpu:dev] [--runs 3] [--json]

Build the snapshot first (with $SNAPBUILD_HOME and $SNAPBUILD_RUN_ROOT as this run will
have them; tests/integration/test_vllm.py builds it in /var/cache/snapbuild-tests/vllm):

    snapbuild build recipes/examples/vllm-cpu.yaml

Modes, alternated within each round so that drift in the machine's load hits all alike:
``cold`` boots the server from its inputs with the compile cache warm (one cold boot
before the rounds, not counted, fills it: torch.compile's kernels in the run folder);
``restore`` restores on this node, which has the snapshot (store, trees, images);
``restore, empty node`` pushes the snapshot once to Debian's docker-registry on
127.0.0.1 (started here), and before each run empties the node: a new store, this
snapshot's written-out trees and checkpoint images deleted, and its run folder moved
aside (put back after the run, so that cold boots keep their compile cache). Each figure
is seconds from the command's start to ready (the runner's ``total_s``); the **first
answer** is the time from the command's start to the first greedy completion, asked
every 10 ms by another process from the start. The answers of every server are
compared (token ids and log-probabilities).
Needs root and CRIU (ci/setup.sh), and docker-registry for the empty node.
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
from pathlib import Path

from snapbuild.runner.bench import _once
from snapbuild.runner.pull import pull
from snapbuild.runner.restore import RestoreFailed
from snapbuild.runtime import probe as probes
from snapbuild.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_containers import summary  # noqa: E402  (tests/bench/bench_containers.py)

ASK = {"model": "/models/tiny-llama", "prompt": "The capital of France is", "max_tokens": 4,
       "temperature": 0, "logprobs": 1, "return_token_ids": True}

#: The first-answer poller: a process of its own, so that it takes no GIL from the runner.
POLL = """
import http.client, json, sys, time
body = sys.argv[2].encode()
while True:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=0.05)
        conn.connect()
        conn.sock.settimeout(60)
        conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status == 200:
            c = json.loads(data)["choices"][0]
            print(time.monotonic(), json.dumps([c["token_ids"], c["logprobs"]]), flush=True)
            break
    except Exception:  # refused, reset or timed out: not up yet
        pass
    time.sleep(0.01)
"""


def empty_node(runtime, work: Path) -> Store:
    """A node that has never seen the snapshot: a new store, and this snapshot's
    written-out input trees (or their mounted images) and checkpoint images gone."""
    from snapbuild.runtime import mounts
    from snapbuild.runtime.layout import images_root, tree_dir
    from snapbuild.runtime.trees import discard

    spec = runtime.server
    root = Path(spec.run_root)
    for digest in spec.inputs.values():
        for point in mounts.mount_points_of(tree_dir(root, digest)):  # the server's `mounts:` of it
            mounts.unmount(point)
        discard(tree_dir(root, digest))
    shutil.rmtree(tree_dir(images_root(spec.run_root), runtime.images_tree), ignore_errors=True)
    return Store(work / f"node-{time.monotonic_ns()}")


class FirstAnswer:
    """Ask for the greedy completion every 10 ms from now on, from another process."""

    def __init__(self, port: int) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", POLL, str(port), json.dumps(ASK)],
                                     stdout=subprocess.PIPE, text=True)

    def result(self, timeout: float = 120) -> tuple[float, str]:
        """(seconds from the start to the first answer, the answer's ids and logprobs)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return float("nan"), ""
        when, _, answer = out.strip().partition(" ")
        return float(when) - self.t0, answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="vllm-cpu:dev")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--registry", help="where the snapshot is (default: the store's own registry); "
                    "tests/integration/test_vllm.py publishes to file:///var/cache/snapbuild-tests/vllm/registry")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
    from conftest import _serve_registry

    from snapbuild.registry import default_registry_url, open_registry, parse_ref
    from snapbuild.registry.transfer import copy

    store = Store()
    source = a.registry or default_registry_url(store.home)
    runtime = pull(a.ref, registry=source, store=store)["snapshot"].runtime
    spec = runtime.server
    port = probes.address(spec.ready)[1]
    run_folder = Path(spec.run_dir)
    work = Path(tempfile.mkdtemp(prefix="snapbuild-bench-vllm-"))
    (work / "registry").mkdir()
    registry_proc, host = _serve_registry(work / "registry")
    registry_url = f"oci://{host}/bench"
    copy(open_registry(source), parse_ref(a.ref), open_registry(registry_url),
         parse_ref(a.ref), store.blobs)
    modes = ("cold", "restore", "restore, empty node")
    times: dict[str, list[float]] = {m: [] for m in modes}
    firsts: dict[str, list[float]] = {m: [] for m in modes}
    phases: dict[str, list[dict]] = {m: [] for m in modes}
    answers: set[str] = set()
    failed: dict[str, str] = {}  # a mode that failed, and why: not run again

    def once(mode: str, node: Store, registry: str | None) -> float:
        first = FirstAnswer(port)
        got: list = []
        try:
            total, out, _ = _once(a.ref, "cold" if mode == "cold" else "restore", node, registry, spec,
                                  before_stop=lambda: got.append(first.result()))
        finally:  # a poller left behind would connect during a later checkpoint
            if first.proc.poll() is None:
                first.proc.kill()
                first.proc.wait()
        if out["mode"] != mode.split(",")[0]:
            raise SystemExit(f"{mode}: the runner {out['mode']}ed instead: {out.get('reason')}")
        firsts[mode].append(got[0][0])
        answers.add(got[0][1])
        phases[mode].append(out["timings"])
        return total

    try:
        primed = once("cold", store, source)  # fills the compile cache; not counted
        times["cold"].clear(), firsts["cold"].clear(), phases["cold"].clear()
        print(f"first cold boot (compile cache filled): {primed:.3f}s", file=sys.stderr)
        for i in range(a.runs):
            for mode in modes:
                if mode in failed:
                    continue
                if mode == "restore, empty node":
                    node = empty_node(runtime, work)
                    aside = work / "run-folder-aside"
                    run_folder.rename(aside)
                    try:
                        times[mode].append(once(mode, node, registry_url))
                    except RestoreFailed as e:  # say why, and go on with the other modes
                        failed[mode] = str(e).splitlines()[0]
                        print(f"run {i + 1}/{a.runs} {mode}: FAILED: {failed[mode]}", file=sys.stderr)
                        continue
                    finally:
                        shutil.rmtree(run_folder, ignore_errors=True)
                        aside.rename(run_folder)
                        shutil.rmtree(node.home, ignore_errors=True)
                else:
                    times[mode].append(once(mode, store, source))
                print(f"run {i + 1}/{a.runs} {mode:<20} {times[mode][-1]:.3f}s "
                      f"(first answer {firsts[mode][-1]:.3f}s)", file=sys.stderr)
    finally:
        registry_proc.terminate()
        registry_proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    times = {m: v for m, v in times.items() if v}
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {
        "ref": a.ref, "runs": a.runs, "cpus": os.cpu_count(), "first_cold_s": round(primed, 3),
        "modes": {m: summary(v) for m, v in times.items()},
        "first_answer": {m: summary(v) for m, v in firsts.items() if v},
        "failed": failed,
        "phases_median_s": {m: {k: round(statistics.median(t.get(k, 0) for t in rows), 3)
                                for k in rows[0] if k.endswith("_s")} for m, rows in phases.items() if rows},
        "ratios": {f"cold / {m}": round(med["cold"] / med[m], 2) for m in med if m != "cold"},
        "checkpoint_images_bytes": runtime.stats.get("images_bytes"),
        "answers_identical": len(answers) == 1,
    }
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{a.ref}: {a.runs} runs per mode, alternated; seconds from the command's start "
          f"({result['cpus']} CPUs; first cold boot, filling the compile cache: {primed:.1f}s)")
    print(f"  {'mode':<22}{'ready':>8}{'min':>8}{'max':>8}{'1st answer':>12}   phases (medians)")
    for m in times:
        v, f = result["modes"][m], result["first_answer"][m]
        row = ", ".join(f"{k[:-2]} {s:.2f}" for k, s in result["phases_median_s"][m].items() if k != "total_s")
        print(f"  {m:<22}{v['median']:>8.3f}{v['min']:>8.3f}{v['max']:>8.3f}{f['median']:>12.3f}   {row}")
    for k, v in result["ratios"].items():
        print(f"  {k}: {v:.1f}x")
    for m, why in failed.items():
        print(f"  {m}: FAILED: {why}")
    print(f"  checkpoint images: {(result['checkpoint_images_bytes'] or 0) / 2**20:.0f} MiB; "
          f"answers identical (token ids, logprobs): {'yes' if result['answers_identical'] else 'NO'}")


if __name__ == "__main__":
    main()
