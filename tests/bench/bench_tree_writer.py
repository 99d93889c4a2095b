#!/usr/bin/env python3
"""The safe tree writer against a plain tar extraction of the same tree, in one run.

    python tests/bench/bench_tree_writer.py SRC_DIR [--runs 5] [--dest-parent DIR] [--json]

SRC_DIR (a Python environment, say) is stored once as a snapshot tree in a scratch store
(chunks, packs, zstd: what a node pulls) and once as a tar file beside it. Then, alternated
in each round so that the machine's drift hits both alike, into a new folder of
``--dest-parent`` (default: beside the scratch store, on the same disk):

- ``snapbuild``: ``store.tree.materialize``, the node's writer: every chunk read from
  the store, verified, decompressed, each path component opened without following a
  link (store.securefs.Beneath), files written on a few threads;
- ``tar -xf``: GNU tar extracting the tar file (no verification, no decompression, paths
  followed as they come).

Each run ends with ``sync`` (timed: the data reach the disk in both) and the folder is
removed before the next (not timed). Prints files/s and MB/s, medians of --runs, and the
ratio. Needs nothing but the base package and tar.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from snapbuild.store import Store  # noqa: E402
from snapbuild.store.fsutil import remove_tree  # noqa: E402
from snapbuild.store.tree import build_tree, load_tree, materialize, tree_size, walk  # noqa: E402


def timed(fn) -> float:
    t = time.monotonic()
    fn()
    subprocess.run(["sync"], check=True)
    return time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dest-parent", type=Path)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="snapbuild-bench-writer-", dir=a.dest_parent))
    try:
        store = Store(work / "store")
        digest, _ = build_tree(store.blobs, walk(a.src))
        tree = load_tree(store.blobs, digest)
        files = sum(1 for e in tree["entries"] if e["type"] == "file")
        size = tree_size(tree)
        tarfile = work / "tree.tar"
        subprocess.run(["tar", "-C", str(a.src), "-cf", str(tarfile), "."], check=True)
        parent = a.dest_parent or work
        times: dict[str, list[float]] = {"snapbuild": [], "tar -xf": []}
        for i in range(a.runs):
            for mode in times:
                dest = parent / f"out-{mode.split()[0]}-{i}"
                if mode == "snapbuild":
                    times[mode].append(timed(lambda d=dest: materialize(store.blobs, tree, d)))
                else:
                    dest.mkdir()
                    times[mode].append(timed(lambda d=dest: subprocess.run(["tar", "-C", str(d), "-xf", str(tarfile)],
                                                                           check=True)))
                remove_tree(dest)
                print(f"run {i + 1}/{a.runs} {mode:<10} {times[mode][-1]:.2f}s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {"src": str(a.src), "files": files, "bytes": size, "runs": a.runs, "cpus": os.cpu_count(),
              "seconds": {m: {"median": round(v, 3), "min": round(min(times[m]), 3), "max": round(max(times[m]), 3)}
                          for m, v in med.items()},
              "files_per_s": {m: round(files / v) for m, v in med.items()},
              "mb_per_s": {m: round(size / v / 1e6, 1) for m, v in med.items()},
              "snapbuild_over_tar": round(med["snapbuild"] / med["tar -xf"], 2)}
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{a.src}: {files} files, {size / 1e6:.0f} MB; medians of {a.runs}, alternated, each ending with sync")
    for m in times:
        s = result["seconds"][m]
        print(f"  {m:<10} {s['median']:>7.2f}s ({s['min']:.2f}-{s['max']:.2f})  "
              f"{result['files_per_s'][m]:>7} files/s  {result['mb_per_s'][m]:>7} MB/s")
    print(f"  snapbuild / tar: {result['snapbuild_over_tar']}x")


if __name__ == "__main__":
    main()
