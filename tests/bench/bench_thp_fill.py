#!/usr/bin/env python3
"""CRIU's page restore with and without ``--thp-fill``: before and after the patch.

    python tests/bench/bench_thp_fill.py [--sizes 1,4] [--runs 5] [--workers K] [--stock CRIU] [--json]

A plain ``criu restore`` writes a server's private memory back into freshly mapped
areas, so every 4 KiB page is a page fault (the kernel allocates and zeroes it, then
the read fills it). ``--thp-fill`` (ci/criu-patches/restore-thp-fill.patch) advises
the big private anonymous areas with MADV_HUGEPAGE while the restorer reads them, one
fault per 2 MiB, and puts the areas' advice back after.

The server (tests/integration/data/memory_server.py) holds N GiB filled from each MiB's
index; it is dumped once to tmpfs, and then restored from the same images, the ways
alternated in each round: the installed (patched) criu without the option and with
``--thp-fill``, and with ``--stock PATH``, a criu built without the patch, too. Every
restore is checked against the warm server's digest of all its memory; the restored
server's huge pages (AnonHugePages; the tree's parent's with --workers) and its
largest area's advice afterwards (``hg``/
``nh`` in smaps' VmFlags) are reported. Beside them, the machine's tmpfs read
bandwidth, for the issue's target (a 4 GiB restore at >= 50% of it), and whether this
machine reports free memory to a host (a VM's virtio balloon), where a fresh huge
page waits for the host (docs/benchmarks.md).
Needs root and CRIU (ci/setup.sh). Timings are medians; the table says how many runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from bench_sizes import GIB, SERVER, bandwidths, check, free_port, get, kill_tree, sh, wait_ready  # noqa: E402
from testkit import huge_pages  # noqa: E402

from snapbuild.engines import criu  # noqa: E402
from snapbuild.runtime.process import tree, wait_gone  # noqa: E402


def start(mib: int, port: int, workers: int) -> subprocess.Popen:
    """The memory server, and its workers on the ports after ``port``, all answering."""
    p = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port), "--mib", str(mib),
                          "--workers", str(workers)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    for i in range(workers + 1):
        wait_ready(port + i)
    return p


def stop_tree(root: int) -> None:
    pids = tree(root)
    kill_tree(root)
    wait_gone(pids, timeout=30)  # the next restore needs the same PIDs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4", help="GiB, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--stock", help="also restore with this criu, built without the patch")
    ap.add_argument("--workers", type=int, default=0, help="the server forks this many workers after filling its "
                    "memory, which share it copy-on-write (the patch's premapped path)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    patched = criu.binary()
    if not criu.has_thp_fill(patched):
        raise SystemExit(f"{patched} has no --thp-fill: run ci/install-criu.sh")
    ways = {"stock": (args.stock, [])} if args.stock else {}
    ways.update({"patched": (patched, []), "patched --thp-fill": (patched, ["--thp-fill"])})
    bw = bandwidths()
    report: dict = {"bandwidths": bw, "runs": args.runs, "reports_free_pages": criu.reports_free_pages(),
                    "workers": args.workers, "sizes": {}}
    for gib in [float(s) for s in args.sizes.split(",")]:
        mib = int(gib * 1024)
        port = free_port()
        images = Path(tempfile.mkdtemp(prefix="bench-thp-", dir="/dev/shm"))
        row: dict = {w: {"restore_s": [], "huge_bytes": [], "advice": set()} for w in ways}
        try:
            server = start(mib, port, args.workers)
            digest = get(port, "/digest")
            pids = tree(server.pid)
            sh(criu.binary(), "dump", "-t", str(server.pid), "-D", str(images), "--tcp-established", "-o", "dump.log")
            server.wait()
            wait_gone(pids, timeout=30)
            for r in range(args.runs):
                for way, (binary, extra) in ways.items():
                    work = Path(tempfile.mkdtemp(prefix="bench-thp-work-"))
                    t = time.monotonic()
                    sh(binary, "restore", "-d", "-D", str(images), "-W", str(work), "--tcp-close", "-o",
                       "restore.log", "--pidfile", str(work / "pid"), *extra)
                    row[way]["restore_s"].append(time.monotonic() - t)
                    restored = int((work / "pid").read_text())
                    huge, advice = huge_pages(restored)
                    for i in range(args.workers + 1):
                        check(get(port + i, "/digest"), digest, way if not i else f"{way}, worker {i}")
                    row[way]["huge_bytes"].append(huge)
                    row[way]["advice"].add(advice)
                    stop_tree(restored)
                    shutil.rmtree(work, ignore_errors=True)
                    print(f"{gib:g} GiB round {r + 1}: {way}: {row[way]['restore_s'][-1]:.3f} s, "
                          f"{huge >> 20} MiB huge", file=sys.stderr)
        finally:
            shutil.rmtree(images, ignore_errors=True)
        for way in row:
            row[way]["advice"] = sorted(row[way]["advice"])
        report["sizes"][f"{gib:g}"] = row
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"tmpfs read {bw['tmpfs_read_gbs']} GB/s, memory copy {bw['memcpy_gbs']} GB/s; medians of {args.runs}; "
          f"free page reporting to a host: {'on' if report['reports_free_pages'] else 'off'}; "
          f"{args.workers} worker(s) sharing the memory")
    print("| size | way | restore | GB/s | of tmpfs read | huge pages | advice after | vs the first way |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for size, row in report["sizes"].items():
        base = statistics.median(next(iter(row.values()))["restore_s"])
        for way, m in row.items():
            med = statistics.median(m["restore_s"])
            gbs = float(size) * GIB / med / 1e9
            print(f"| {size} GiB | {way} | {med:.3f} s | {gbs:.2f} | {gbs / bw['tmpfs_read_gbs']:.0%} | "
                  f"{statistics.median(m['huge_bytes']) / 2**20:.0f} MiB | {', '.join(m['advice'])} | "
                  f"{base / med:.2f}x |")


if __name__ == "__main__":
    main()
