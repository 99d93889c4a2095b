#!/usr/bin/env python3
"""Restore time against memory size: does it grow no faster than the bytes?

    python tests/bench/bench_sizes.py [--sizes 0.5,1,2,4,8] [--runs 3] [--chart docs/sizes.png] [--json]

The server (tests/integration/data/memory_server.py) holds N GiB of private anonymous
memory, each MiB filled from its index; GET /digest hashes all of it, and every restore
is checked against the warm server's digest (a restore that loses a page is reported,
never timed). For each N, side by side in this one process tree:

- ``criu``: the raw binary, ``criu dump`` of the running server to tmpfs, then
  ``criu restore -d`` from there (the page cache is warm: the images are on tmpfs);
- ``criu --thp-fill``: the same plain restore reading the memory into huge pages
  (ci/criu-patches/restore-thp-fill.patch; left out with a criu that lacks it);
- ``criu lazy``: ``criu lazy-pages`` plus ``criu restore --lazy-pages`` from the same
  images, timed to the first answer (GET /healthz) and to the daemon's exit (every page
  in place);
- ``snapbuild``: a recipe (warm-up + checkpoint) built into a store, then
  ``snapbuild-runner restore`` (``run()``) on a node that has the snapshot, with lazy
  pages off (small pages, and huge pages: ``SNAPBUILD_THP_FILL=off`` and ``on``) and on, and on an **empty node**: a new store that pulls the snapshot from
  the build's registry (a local directory) and writes the checkpoint images out before
  restoring (lazy pages on, the default), straight from the registry (the default) and
  with every blob stored first (``SNAPBUILD_PULL_DIRECT=off``);
- ``podman``: the same server in a container of a Debian image (ci/make-rootfs.sh's
  rootfs, ``podman import``-ed once; ``--network host``), ``podman container
  checkpoint`` and ``podman container restore`` (its images stay in Podman's storage:
  Podman's node always "has the snapshot").

Throughput is N GiB over the time to the first answer, and over the time until every
page is in place (for a plain restore both are the restore). Beside them, measured
once: this machine's memory-copy bandwidth (1 GiB copied between two bytearrays) and
tmpfs read bandwidth (a 1 GiB file in /dev/shm read into a buffer), medians of 5.
--chart writes a PNG with matplotlib (``pip install -e '.[bench]'``). Needs root, CRIU
and podman (ci/setup.sh installs them). Each size needs about 2N GiB of memory free
(the server and its images on tmpfs): 8 GiB fits a 24 GiB machine with nothing else
running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from snapbuild.build import build
from snapbuild.engines import criu
from snapbuild.runner.restore import run, stop
from snapbuild.runtime.layout import images_root, tree_dir
from snapbuild.store import Store

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "tests" / "integration" / "data" / "memory_server.py"
GIB = 1 << 30


def get(port: int, path: str, timeout: float = 120) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read()


def wait_ready(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get(port, "/healthz", timeout=1) == b"ok":
                return
        except OSError:
            pass
        time.sleep(0.002)
    raise SystemExit(f"the server on port {port} did not get ready within {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.01)


def bandwidths() -> dict:
    """GB/s of a memory copy and of reading a tmpfs file, medians of 5."""
    src, dst = bytearray(os.urandom(1 << 20) * 1024), bytearray(GIB)
    copy = []
    for _ in range(5):
        t = time.perf_counter()
        dst[:] = src
        copy.append(GIB / (time.perf_counter() - t) / 1e9)
    path = Path("/dev/shm/snapbuild-bench-read")
    path.write_bytes(src)
    read = []
    try:
        view = memoryview(dst)
        for _ in range(5):
            t = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                got = 0
                while got < GIB:
                    got += f.readinto(view[got:]) or 0
            read.append(GIB / (time.perf_counter() - t) / 1e9)
    finally:
        path.unlink()
    return {"memcpy_gbs": round(statistics.median(copy), 2), "tmpfs_read_gbs": round(statistics.median(read), 2)}


def start_server(mib: int, port: int) -> int:
    p = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port), "--mib", str(mib)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    wait_ready(port)
    return p.pid


def raw_criu(mib: int, runs: int, digest: bytes, port: int) -> dict:
    """Dump and restore with the criu binary alone, images on tmpfs."""
    images = Path(tempfile.mkdtemp(prefix="bench-sizes-", dir="/dev/shm"))
    crit = criu.binary()
    out: dict = {"dump_s": [], "restore_s": [], "thp_s": [], "lazy_first_s": [], "lazy_all_s": []}
    ways = [(False, []), (True, [])] + ([(False, [criu.THP_FILL])] if criu.has_thp_fill(crit) else [])
    try:
        pid = start_server(mib, port)
        t = time.monotonic()
        sh(crit, "dump", "-t", str(pid), "-D", str(images), "--tcp-established", "-o", "dump.log")
        out["dump_s"].append(time.monotonic() - t)
        kill_tree(pid)
        for _ in range(runs):
            for lazy, extra in ways:
                work = Path(tempfile.mkdtemp(prefix="bench-sizes-work-"))
                t = time.monotonic()
                daemon = None
                if lazy:
                    r, w = os.pipe()
                    daemon = subprocess.Popen([crit, "lazy-pages", "-D", str(images), "-W", str(work), "-o",
                                               "lazy.log", "--status-fd", str(w)], pass_fds=[w])
                    os.close(w)
                    os.read(r, 1)
                    os.close(r)
                sh(crit, "restore", "-d", "-D", str(images), "-W", str(work), "--tcp-close", "-o", "restore.log",
                   "--pidfile", str(work / "pid"), *(["--lazy-pages"] if lazy else []), *extra)
                wait_ready(port)
                first = time.monotonic() - t
                if daemon:
                    daemon.wait()
                every = time.monotonic() - t
                check(get(port, "/digest"), digest, "criu lazy" if lazy else "criu")
                kill_tree(int((work / "pid").read_text()))
                shutil.rmtree(work, ignore_errors=True)
                if lazy:
                    out["lazy_first_s"].append(first)
                    out["lazy_all_s"].append(every)
                else:
                    out["thp_s" if extra else "restore_s"].append(every)
    finally:
        shutil.rmtree(images, ignore_errors=True)
    return out


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, cwd="/tmp")
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])}... failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return r.stdout.strip()


def check(got: bytes, want: bytes, who: str) -> None:
    if got != want:
        raise SystemExit(f"{who}: the restored server's memory differs from the warm server's "
                         f"(digest {got[:16]!r}, want {want[:16]!r})")


def snapbuild_runs(mib: int, runs: int, digest: bytes, port: int, work: Path) -> dict:
    project = work / "project"
    (project / "app").mkdir(parents=True)
    shutil.copy(SERVER, project / "app" / "memory_server.py")
    (project / "recipe.yaml").write_text(f"""
name: sizes
steps:
  app: {{kind: files, root: app}}
  server:
    kind: warmup
    needs: [app]
    run: "{sys.executable} $SNAPBUILD_INPUTS/app/memory_server.py --port {port} --mib {mib}"
    ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 600}}
  snap: {{kind: checkpoint, process: server}}
publish: {{tag: "sizes:{mib}"}}
""")
    store = Store(work / "home")
    t = time.monotonic()
    [res] = build(project / "recipe.yaml", store=store)
    if not res.ok:
        raise SystemExit(f"the build failed: { {n: r.error for n, r in res.steps.items() if r.error} }")
    out: dict = {"build_s": [time.monotonic() - t], "restore_s": [], "thp_s": [], "lazy_first_s": [], "lazy_all_s": [],
                 "empty_first_s": [], "empty_all_s": [], "stored_first_s": [], "stored_all_s": []}
    ref = f"sizes:{mib}"

    def once(node: Store, lazy: bool, thp: str = "auto", **kw) -> tuple[float, float]:
        os.environ[criu.THP_ENV] = thp
        try:
            r = run(ref, store=node, lazy_pages=lazy, fallback="fail", **kw)
        finally:
            os.environ.pop(criu.THP_ENV)
        try:
            check(get(port, "/digest"), digest, "snapbuild")
        finally:
            stop(r["pid"])
        tm = r["timings"]
        every = tm["total_s"]
        return every - tm.get("pages_s", 0.0), every

    registry = f"file://{store.home / 'registry'}"
    for i in range(runs):
        # The empty node first: it writes the images out again (the run root is shared), so
        # the two restores after it find a node that has the snapshot, images and all.
        for key, direct in (("empty", "on"), ("stored", "off")):
            node = Store(work / f"{key}-{i}")
            shutil.rmtree(images_root_of(store, ref), ignore_errors=True)
            os.environ["SNAPBUILD_PULL_DIRECT"] = direct
            try:
                first, every = once(node, True, registry=registry)
            finally:
                os.environ.pop("SNAPBUILD_PULL_DIRECT")
            out[f"{key}_first_s"].append(first)
            out[f"{key}_all_s"].append(every)
            shutil.rmtree(node.home, ignore_errors=True)
        out["restore_s"].append(once(store, False, thp="off")[1])
        if criu.has_thp_fill(criu.binary()):
            out["thp_s"].append(once(store, False, thp="on")[1])
        first, every = once(store, True)
        out["lazy_first_s"].append(first)
        out["lazy_all_s"].append(every)
    shutil.rmtree(images_root_of(store, ref), ignore_errors=True)  # N GiB of tmpfs
    return out


def images_root_of(store: Store, ref: str) -> Path:
    """The written-out checkpoint images of ``ref``, which an empty node has not."""
    from snapbuild.runner.pull import pull

    runtime = pull(ref, store=store)["snapshot"].runtime
    return tree_dir(images_root(runtime.server.run_root), runtime.images_tree)


PODMAN_IMAGE = "localhost/snapbuild-bench-sizes:bookworm"


def podman_image(rootfs_tar: Path) -> str:
    """Podman's image of the Debian rootfs (imported once)."""
    if subprocess.run(["podman", "image", "exists", PODMAN_IMAGE]).returncode != 0:
        sh("podman", "import", "-q", str(rootfs_tar), PODMAN_IMAGE)
    return PODMAN_IMAGE


def podman_runs(mib: int, runs: int, digest: bytes, port: int, image: str) -> dict:
    name = f"bench-sizes-{mib}"
    subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)
    out: dict = {"dump_s": [], "restore_s": []}
    sh("podman", "run", "-d", "--name", name, "--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",
       "-v", f"{SERVER}:/srv/memory_server.py:ro", image, "python3", "/srv/memory_server.py", "--port", str(port), "--mib", str(mib))
    try:
        wait_ready(port)
        for _ in range(runs):
            t = time.monotonic()
            sh("podman", "container", "checkpoint", name)
            out["dump_s"].append(time.monotonic() - t)
            t = time.monotonic()
            sh("podman", "container", "restore", name)
            wait_ready(port)
            out["restore_s"].append(time.monotonic() - t)
            check(get(port, "/digest"), digest, "podman")
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5,1,2,4,8", help="GiB, comma-separated (default 0.5,1,2,4,8)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chart", type=Path, help="write a PNG chart here (needs matplotlib)")
    ap.add_argument("--no-podman", action="store_true", help="leave Podman out")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the report (JSON) here, after every size")
    ap.add_argument("--from-json", type=Path, metavar="FILE", help="print the table and draw the chart of a "
                    "report written by --out, measuring nothing")
    args = ap.parse_args()
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        print_table(report)
        if args.chart:
            chart(report, args.chart)
        return
    sizes = [float(s) for s in args.sizes.split(",")]
    image = None
    if not args.no_podman:
        image = podman_image(Path(sh(str(REPO / "ci" / "make-rootfs.sh"), "bookworm", "python3,python3-numpy")))
    machine = {**bandwidths(), "reports_free_pages": criu.reports_free_pages()}
    print(f"memcpy {machine['memcpy_gbs']} GB/s, tmpfs read {machine['tmpfs_read_gbs']} GB/s", file=sys.stderr)
    results = []
    for gib in sizes:
        mib = int(gib * 1024)
        port = free_port()
        pid = start_server(mib, port)
        digest = get(port, "/digest")
        kill_tree(pid)
        row: dict = {"gib": gib}
        print(f"{gib} GiB: criu", file=sys.stderr)
        row["criu"] = raw_criu(mib, args.runs, digest, port)
        print(f"{gib} GiB: snapbuild", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="bench-sizes-") as work:
            row["snapbuild"] = snapbuild_runs(mib, args.runs, digest, port, Path(work))
        if image:
            print(f"{gib} GiB: podman", file=sys.stderr)
            row["podman"] = podman_runs(mib, args.runs, digest, port, image)
        for tool in ("criu", "snapbuild", "podman"):
            for k, v in list(row.get(tool, {}).items()):
                if v:  # no huge page rows without the patched criu
                    row[tool][k] = round(statistics.median(v), 4)
                else:
                    del row[tool][k]
        results.append(row)
        if args.out:
            args.out.write_text(json.dumps({"machine": machine, "runs": args.runs, "sizes": results}, indent=2))
        print_table({"machine": machine, "runs": args.runs, "sizes": [row]}, file=sys.stderr)
    report = {"machine": machine, "runs": args.runs, "sizes": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    if args.chart:
        chart(report, args.chart)


COLUMNS = [  # (label, tool, key): a time in seconds
    ("criu dump", "criu", "dump_s"), ("criu restore", "criu", "restore_s"),
    ("criu restore --thp-fill", "criu", "thp_s"),
    ("criu lazy, 1st answer", "criu", "lazy_first_s"), ("criu lazy, all pages", "criu", "lazy_all_s"),
    ("snapbuild restore", "snapbuild", "restore_s"), ("snapbuild restore, huge pages", "snapbuild", "thp_s"),
    ("snapbuild lazy, 1st answer", "snapbuild", "lazy_first_s"),
    ("snapbuild lazy, all pages", "snapbuild", "lazy_all_s"),
    ("snapbuild empty node, 1st answer", "snapbuild", "empty_first_s"),
    ("snapbuild empty node, all pages", "snapbuild", "empty_all_s"),
    ("snapbuild empty node, stored first, 1st answer", "snapbuild", "stored_first_s"),
    ("snapbuild empty node, stored first, all pages", "snapbuild", "stored_all_s"),
    ("podman checkpoint", "podman", "dump_s"), ("podman restore", "podman", "restore_s")]


def print_table(report: dict, file=sys.stdout) -> None:
    m = report["machine"]
    print(f"medians of {report['runs']} runs; memcpy {m['memcpy_gbs']} GB/s, tmpfs read {m['tmpfs_read_gbs']} GB/s"
          + ("" if "reports_free_pages" not in m else
             f"; free page reporting to a host {'on' if m['reports_free_pages'] else 'off'}"), file=file)
    print(f"| {'':46} | " + " | ".join(f"{r['gib']:>5g} GiB" for r in report["sizes"]) + " |", file=file)
    for label, tool, key in COLUMNS:
        cells = []
        for r in report["sizes"]:
            s = r.get(tool, {}).get(key)
            rate = "    " if "1st answer" in label else f"{r['gib'] * GIB / s / 1e9:4.1f}" if s else ""
            cells.append("        -" if s is None else f"{s:5.2f} s {rate}")
        print(f"| {label:46} | " + " | ".join(cells) + " |", file=file)
    print("(each cell: seconds, then GB/s of a complete dump or restore)", file=file)


def chart(report: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--chart needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    xs = [r["gib"] for r in report["sizes"]]
    for label, tool, key in COLUMNS:
        pts = [(r["gib"], r[tool][key]) for r in report["sizes"] if r.get(tool, {}).get(key)]
        if not pts:
            continue
        style = "--" if "dump" in key else "-"
        left.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        if "dump" not in key and "1st answer" not in label:  # throughput of a complete restore
            right.plot([p[0] for p in pts], [p[0] * GIB / p[1] / 1e9 for p in pts], marker="o", label=label)
    m = report["machine"]
    right.axhline(m["tmpfs_read_gbs"], color="grey", linestyle="--", label=f"tmpfs read {m['tmpfs_read_gbs']} GB/s")
    right.axhline(m["tmpfs_read_gbs"] / 2, color="grey", linestyle=":", label="50% of tmpfs read (target)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel("server memory (GiB)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("seconds (median)")
    left.set_title("Dump and restore times")
    right.set_ylabel("GB/s (memory size / time to every page in place)")
    right.set_title("Complete restores: throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
