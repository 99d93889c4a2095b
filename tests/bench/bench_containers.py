#!/usr/bin/env python3
"""Container start-up: snapbuild's runc restore against a cold boot, and against Podman
checkpointing and restoring the same container, side by side in one process tree.

    python tests/bench/bench_containers.py [--ref container-torch:dev] [--runs 5] [--empty-node] [--json]

The snapshot must be built first (see recipes/examples/container-torch.yaml). Podman
gets the very same image (its layers exported from the store as a docker archive),
the same command, environment, read-only root and input mounts, and runs with
``--network host`` (it has no network of its own here) and the lowered limits it needs
on this machine (``--ulimit nofile=1024:1024 --ulimit nproc=4096:4096``). Its checkpoint
is the portable form a user would ship: ``podman container checkpoint --export
X.tar.zst --compress zstd``, restored with ``podman container restore --import``.

Podman's container is warmed like the reference recipes' warm-up (three ``POST /infer``)
before its export. Each figure is the time from the command's start to a passing
readiness probe (snapbuild's own probe; for Podman an HTTP GET polled every 10 ms),
median of --runs, with the page cache warm; the modes
alternate within each round so that drift in the machine's load hits all alike.
With --empty-node, one more mode: ``snapbuild restore, empty node``. The snapshot is
pushed once to an OCI registry on 127.0.0.1 (Debian's docker-registry, started here),
and before each run the node is emptied: a new store, and the written-out layers,
input trees and checkpoint images of this snapshot deleted; the run then pulls the
whole snapshot from the registry (verified), writes it out and restores. Podman's
figure has its image already in its storage and the export on local disk: the
comparison favours Podman.
Needs root, runc, CRIU and podman (ci/setup.sh installs them).
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

from snapbuild.image.layers import write_docker_archive
from snapbuild.runner.bench import _digest_only, _once
from snapbuild.runner.pull import pull
from snapbuild.runtime import container, probe as probes
from snapbuild.runtime.server import _expand
from snapbuild.runtime.trees import ensure_tree
from snapbuild.store import Store

PODMAN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


def sh(*argv: str, check: bool = True) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout.strip()


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if 200 <= r.status < 300:
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise SystemExit(f"{url} not ready after {timeout} s")


def infer(port: int) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/infer", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return _digest_only(r.read().decode())


def podman_image(store: Store, spec: dict, work: Path) -> str:
    """Load the snapshot's image into Podman, from the store's layers."""
    config, layers = container.write_layers(store.blobs, spec["image"], work / "layers")
    tag = f"localhost/snapbuild-bench:{spec['image'].split(':')[1][:12]}"
    with open(work / "image.tar", "wb") as f:
        write_docker_archive(f, config, layers, tag)
    sh("podman", "load", "-q", "-i", str(work / "image.tar"))
    return tag


def podman_run_args(store: Store, spec: dict, image: str, run_dir: Path, name: str) -> list[str]:
    env = container.container_env(spec)
    argv = [_expand(a, env) for a in spec["argv"]]
    root = Path(spec["run_root"])
    args = ["podman", "run", "-d", "--name", name, "--network", "host", "--read-only", *PODMAN_LIMITS,
            "-v", f"{run_dir}:{container.RUN}"]
    for step, digest in sorted(spec["inputs"].items()):
        args += ["-v", f"{ensure_tree(store.blobs, digest, root)[0]}:{container.INPUTS}/{step}:ro"]
    for dest, step in sorted((spec.get("mounts") or {}).items()):
        args += ["-v", f"{ensure_tree(store.blobs, spec['inputs'][step], root)[0]}:{dest}:ro"]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    cwd = spec.get("cwd") or spec["image_config"].get("WorkingDir") or "/"
    wrapper = f'exec "$@" </dev/null >>{container.RUN}/{container.LOG_NAME} 2>&1'
    return args + ["-w", _expand(cwd, env), image, "/bin/sh", "-c", wrapper, "sh", *argv]


def empty_node(runtime: dict, store: Store, work: Path) -> Store:
    """A node that has never seen the snapshot: a new store, and this snapshot's
    written-out layers, input trees and checkpoint images gone."""
    from snapbuild.rootfs import MARKER as LAYER_MARKER
    from snapbuild.runner.restore import _images_root
    from snapbuild.runtime.container import read_image
    from snapbuild.runtime.trees import tree_dir

    spec = runtime["server"]
    root = Path(spec["run_root"])
    for digest in spec["inputs"].values():
        shutil.rmtree(tree_dir(root, digest), ignore_errors=True)
    shutil.rmtree(tree_dir(_images_root(spec), runtime["artifact"]), ignore_errors=True)
    for layer in read_image(store.blobs, spec["image"])[0]["layers"]:
        hexd = layer["digest"].split(":", 1)[1]
        (root / "layers" / f"{hexd}{LAYER_MARKER}").unlink(missing_ok=True)
        shutil.rmtree(root / "layers" / hexd, ignore_errors=True)
    fresh = work / f"node-{time.monotonic_ns()}"
    return Store(fresh)


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "runs": [round(v, 4) for v in values]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="container-torch:dev")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--empty-node", action="store_true",
                    help="also restore on an empty node, pulling the snapshot from an OCI registry")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    for tool in ("podman", "runc"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (run ci/setup.sh as root)")

    store = Store()
    runtime = pull(a.ref, store=store)["config"]["runtime"]
    spec = runtime["server"]
    port = probes.address(spec["ready"])[1]
    url = f"http://127.0.0.1:{port}{spec['ready']['http'].split(str(port), 1)[1]}"
    name = "snapbuild-bench"
    work = Path(tempfile.mkdtemp(prefix="snapbuild-bench-"))
    run_dir = work / "run"
    run_dir.mkdir()
    times: dict[str, list[float]] = {k: [] for k in ("snapbuild cold", "snapbuild restore", "podman cold",
                                                       "podman restore --import")}
    answers: set[str] = set()
    registry_proc = registry_url = None
    if a.empty_node:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
        from conftest import _serve_registry

        from snapbuild.registry import default_registry_url, open_registry, parse_ref
        from snapbuild.registry.transfer import copy

        (work / "registry").mkdir()
        registry_proc, host = _serve_registry(work / "registry")
        registry_url = f"oci://{host}/bench"
        copy(open_registry(default_registry_url(store.home)), parse_ref(a.ref), open_registry(registry_url),
             parse_ref(a.ref), store.blobs)
        times["snapbuild restore, empty node"] = []
    sh("podman", "rm", "-f", name, check=False)
    image = podman_image(store, spec, work)
    try:
        # Podman's checkpoint of the same warm container: started, warmed as the recipe
        # says, exported once.
        sh(*podman_run_args(store, spec, image, run_dir, name))
        wait_http(url)
        for _ in range(3):  # the reference recipes' warm-up: three POST /infer
            infer(port)
        export = work / "checkpoint.tar.zst"
        t = time.monotonic()
        sh("podman", "container", "checkpoint", "--export", str(export), "--compress", "zstd", name)
        export_s = time.monotonic() - t
        export_bytes = export.stat().st_size
        sh("podman", "rm", "-f", name)

        for i in range(a.runs):
            for mode in times:
                t0 = time.monotonic()
                if mode == "snapbuild restore, empty node":
                    node = empty_node(runtime, store, work)
                    total, out, answer = _once(a.ref, "restore", node, registry_url, spec)
                    times[mode].append(total)
                    answers.add(_digest_only(answer))
                    shutil.rmtree(node.home, ignore_errors=True)
                elif mode.startswith("snapbuild"):
                    total, out, answer = _once(a.ref, mode.split()[1], store, None, spec)
                    if out["mode"] != mode.split()[1]:
                        print(f"note: {mode} fell back: {out['reason']}", file=sys.stderr)
                    times[mode].append(total)
                    answers.add(_digest_only(answer))
                else:
                    if mode == "podman cold":
                        sh(*podman_run_args(store, spec, image, run_dir, name))
                    else:
                        sh("podman", "container", "restore", "--import", str(export), "--name", name)
                    wait_http(url)
                    times[mode].append(time.monotonic() - t0)
                    answers.add(infer(port))
                    sh("podman", "rm", "-f", "-t", "0", name)
                print(f"run {i + 1}/{a.runs} {mode:<24} {times[mode][-1]:.3f}s", file=sys.stderr)
    finally:
        if registry_proc is not None:
            registry_proc.terminate()
        sh("podman", "rm", "-f", "-t", "0", name, check=False)
        sh("podman", "rmi", "-f", image, check=False)
        shutil.rmtree(work, ignore_errors=True)

    result = {"ref": a.ref, "runs": a.runs, "modes": {k: summary(v) for k, v in times.items()},
              "podman_export_s": round(export_s, 3), "podman_export_bytes": export_bytes,
              "answers_match": len(answers) == 1,
              "snapbuild_checkpoint_images_bytes": runtime.get("stats", {}).get("images_bytes")}
    med = {k: v["median"] for k, v in result["modes"].items()}
    result["ratios"] = {
        "snapbuild restore vs snapbuild cold": round(med["snapbuild cold"] / med["snapbuild restore"], 2),
        "podman restore vs podman cold": round(med["podman cold"] / med["podman restore --import"], 2),
        "snapbuild restore vs podman restore": round(med["podman restore --import"] / med["snapbuild restore"], 2),
    }
    if "snapbuild restore, empty node" in med:
        result["ratios"]["snapbuild restore on an empty node vs podman restore"] = round(
            med["podman restore --import"] / med["snapbuild restore, empty node"], 2)
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{a.ref}: {a.runs} runs per mode, alternated; seconds from the command's start to ready "
          f"(page cache warm; {os.cpu_count()} CPUs)")
    print(f"  {'mode':<26}{'median':>8}{'min':>8}{'max':>8}")
    for k, v in result["modes"].items():
        print(f"  {k:<26}{v['median']:>8.3f}{v['min']:>8.3f}{v['max']:>8.3f}")
    for k, v in result["ratios"].items():
        print(f"  {k}: " + (f"{v}x faster" if v >= 1 else f"{1 / v:.2f}x slower"))
    print(f"  podman checkpoint --export: {result['podman_export_s']:.2f}s, "
          f"{(result['podman_export_bytes'] or 0) / 2**20:.1f} MiB; snapbuild checkpoint images: "
          f"{(result['snapbuild_checkpoint_images_bytes'] or 0) / 2**20:.1f} MiB")
    print(f"  answers identical across modes: {'yes' if result['answers_match'] else 'NO'}")


if __name__ == "__main__":
    main()
