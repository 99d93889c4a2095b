#!/usr/bin/env python3
"""What a virtual machine's free page reporting costs a restore: writing into fresh memory.

    python tests/bench/bench_page_reporting.py [--gib 1] [--rounds 5] [--pause 3]

A restore writes the checkpoint's pages into memory the kernel has just given the
process. In a VM with free page reporting (virtio-balloon's ``page_reporting``; this
machine's kernel reports freed blocks at once, ``min_free_ms=0``), memory that a
stopped server gave back has been handed to the host, and the next process to use it
waits for the host to fault it in again. This script copies ``--gib`` GiB into a fresh
anonymous mapping, ``--rounds`` times, each after freeing the previous one and waiting
``--pause`` seconds (what a node does between a stop and the next restore), first with
the machine's setting, then with reporting held back for two minutes
(``min_free_ms=120000``), then again with the machine's setting; the setting is put back
whatever happens (and ``max_waiting_mib``, the most it holds back, raised with it).
Prints GB/s (medians) and the ratio. Needs root; without
/sys/module/page_reporting it says there is nothing to compare.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

KNOB = Path("/sys/module/page_reporting/parameters/min_free_ms")
CAP = Path("/sys/module/page_reporting/parameters/max_waiting_mib")
HELD_MS, HELD_CAP_MIB = 120_000, 65_536


def fresh_copy(src: bytes, rounds: int, pause: float) -> list[float]:
    out = []
    for _ in range(rounds):
        time.sleep(pause)
        m = mmap.mmap(-1, len(src), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        t = time.perf_counter()
        m[:] = src  # every 4 KiB page faulted in (and zeroed) on first write
        out.append(len(src) / (time.perf_counter() - t) / 1e9)
        m.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pause", type=float, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if not KNOB.exists():
        raise SystemExit("this kernel has no free page reporting (/sys/module/page_reporting): nothing to compare")
    src = os.urandom(1 << 20) * int(a.gib * 1024)
    machine = KNOB.read_text().strip()
    cap = CAP.read_text().strip() if CAP.exists() else None
    rows = []
    try:
        for label, value in (("machine's", machine), ("held back", str(HELD_MS)), ("machine's again", machine)):
            KNOB.write_text(value)
            if cap is not None:
                CAP.write_text(cap if value == machine else str(HELD_CAP_MIB))
            got = fresh_copy(src, a.rounds, a.pause)
            rows.append({"reporting": label, "min_free_ms": int(value), "gbs": round(statistics.median(got), 2),
                         "all": [round(g, 2) for g in got]})
            print(f"{label} (min_free_ms={value}): {rows[-1]['all']} GB/s", file=sys.stderr)
    finally:
        KNOB.write_text(machine)
        if cap is not None:
            CAP.write_text(cap)
    if a.json:
        print(json.dumps({"gib": a.gib, "rounds": a.rounds, "pause_s": a.pause, "rows": rows}, indent=2))
        return
    base = rows[0]["gbs"]
    print(f"copy of {a.gib:g} GiB into fresh anonymous memory, {a.pause:g} s after the last one was freed; "
          f"medians of {a.rounds}")
    print(f"  {'free page reporting':<34} {'GB/s':>6} {'x machine':>10}")
    for r in rows:
        print(f"  {r['reporting'] + ' (min_free_ms=' + str(r['min_free_ms']) + ')':<34} {r['gbs']:>6.2f} "
              f"{r['gbs'] / base:>9.2f}x")


if __name__ == "__main__":
    main()
