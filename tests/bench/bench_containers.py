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
comparison favours Podman. So --empty-node adds Podman on an empty node too,
``podman restore --import, empty node``: an image that holds the server's inputs
(torch and the weights, one more layer at the paths the server reads them from: how
a Podman user ships such a server) is pushed once to the same registry, a container of
it is warmed and exported the same way, and before each run the image is removed from
Podman's storage; the run is ``podman pull`` from the registry plus ``podman container
restore --import`` (the export, 26 MiB, stays on local disk: still in Podman's favour).
--empty-node measures two ways snapbuild can do it: the default, which writes the
checkpoint's images and the tree images straight from the registry to their place
(``SNAPBUILD_PULL_DIRECT``, store/direct.py), storing only the rest; storing every
blob first, then writing out of the store (``SNAPBUILD_PULL_DIRECT=off``); and, for
each, the time to the **first answer** (``POST /infer`` polled every 10 ms from the
command's start); and the **wire limit** beside them: the time to GET every blob of
the snapshot the pulls need (with tree images: what image_selection names) from the
same registry with as many parallel plain HTTP requests as the pull uses (16) and
write each to a file on the store's disk (fsync'd, as the store does), without
verifying, decompressing or writing anything out of them.
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

from snapbuild.image.layers import write_docker_archive, write_layers
from snapbuild.runner.bench import _once
from snapbuild.runner.pull import pull
from snapbuild.runtime import container, probe as probes
from snapbuild.runtime.server import _expand
from snapbuild.runtime.trees import ensure_tree
from snapbuild.schema import Runtime, ServerSpec
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


def _digest_only(answer: str) -> str:
    """Compare answers without the per-process call counter."""
    try:
        obj = json.loads(answer)
        obj.pop("calls", None)
        return json.dumps(obj, sort_keys=True)
    except ValueError:
        return answer


def infer(port: int, timeout: float = 60) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/infer", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return _digest_only(r.read().decode())


def podman_image(store: Store, spec: ServerSpec, work: Path) -> str:
    """Load the snapshot's image into Podman, from the store's layers."""
    config, layers = write_layers(store.blobs, spec.image, work / "layers")
    tag = f"localhost/snapbuild-bench:{spec.image.split(':')[1][:12]}"
    with open(work / "image.tar", "wb") as f:
        write_docker_archive(f, config, layers, tag)
    sh("podman", "load", "-q", "-i", str(work / "image.tar"))
    return tag


def input_paths(store: Store, spec: ServerSpec) -> list[tuple[Path, str]]:
    """(folder on this node, path in the container) of every input the server reads."""
    root = Path(spec.run_root)
    out = [(ensure_tree(store.blobs, digest, root)[0], f"{container.INPUTS}/{step}")
           for step, digest in sorted(spec.inputs.items())]
    return out + [(ensure_tree(store.blobs, spec.inputs[step], root)[0], dest)
                  for dest, step in sorted(spec.mounts.items())]


def podman_full_image(store: Store, spec: ServerSpec, work: Path) -> str:
    """The same image with the server's inputs inside, in one more layer."""
    import copy
    import hashlib
    import tarfile

    from snapbuild.image.layers import Layer

    config, layers = write_layers(store.blobs, spec.image, work / "layers")
    tar_path, h = work / "inputs.tar", hashlib.sha256()

    class Hashing:  # the layer's diff_id, computed while it is written
        def __init__(self, f):
            self.f = f

        def write(self, b):
            h.update(b)
            return self.f.write(b)

    with open(tar_path, "wb") as raw, tarfile.open(fileobj=Hashing(raw), mode="w|") as tar:
        for src, dest in input_paths(store, spec):
            tar.add(src, arcname=dest.lstrip("/"))
    config = copy.deepcopy(config)
    config["rootfs"]["diff_ids"].append("sha256:" + h.hexdigest())
    config.setdefault("history", []).append({"created_by": "snapbuild bench: the server's inputs"})
    tag = f"localhost/snapbuild-bench-full:{spec.image.split(':')[1][:12]}"
    with open(work / "full.tar", "wb") as f:
        write_docker_archive(f, config, layers + [Layer("sha256:" + h.hexdigest(), tar_path.stat().st_size,
                                                        tar_path)], tag)
    sh("podman", "load", "-q", "-i", str(work / "full.tar"))
    (work / "full.tar").unlink()
    tar_path.unlink()
    return tag


def podman_run_args(store: Store, spec: ServerSpec, image: str, run_dir: Path, name: str,
                    inputs_in_image: bool = False) -> list[str]:
    env = container.container_env(spec)
    argv = [_expand(a, env) for a in spec.argv]
    args = ["podman", "run", "-d", "--name", name, "--network", "host", "--read-only", *PODMAN_LIMITS,
            "-v", f"{run_dir}:{container.RUN}"]
    if not inputs_in_image:
        for src, dest in input_paths(store, spec):
            args += ["-v", f"{src}:{dest}:ro"]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    cwd = spec.cwd or (spec.image_config or {}).get("WorkingDir") or "/"
    wrapper = f'exec "$@" </dev/null >>{container.RUN}/{container.LOG_NAME} 2>&1'
    return args + ["-w", _expand(cwd, env), image, "/bin/sh", "-c", wrapper, "sh", *argv]


#: The empty-node modes, with the environment each runs in (the first is the default).
EMPTY_NODE = {
    "snapbuild restore, empty node": {"SNAPBUILD_PULL_DIRECT": "on"},
    "snapbuild restore, empty node, every blob stored first": {"SNAPBUILD_PULL_DIRECT": "off"},
}


#: The first-answer poller: a process of its own, so that it takes no GIL from the runner.
POLL = """
import http.client, socket, sys, time
while True:
    try:
        # A short connect timeout: a SYN sent while the restored network is not up yet is
        # retried by the kernel only after a second, which would be counted as start-up.
        conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=0.05)
        conn.connect()
        conn.sock.settimeout(5)
        conn.request("POST", "/infer", body=b"{}")
        r = conn.getresponse()
        if r.status == 200:
            r.read()
            print(time.monotonic(), flush=True)
            break
    except Exception:  # refused, reset, timed out, or a forwarder that closed early
        pass
    time.sleep(0.01)
"""


class FirstAnswer:
    """POST /infer to ``port`` every 10 ms from now on, from another process, until one
    answers: the time to the first answer of a restore, from its command's start."""

    def __init__(self, port: int) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", POLL, str(port)],
                                     stdout=subprocess.PIPE, text=True)

    def seconds(self, timeout: float = 10) -> float | None:
        """Seconds from the start to the first answer (waiting for it up to ``timeout``)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return None
        return float(out) - self.t0 if out.strip() else None


def empty_node(runtime: Runtime, store: Store, work: Path) -> Store:
    """A node that has never seen the snapshot: a new store, and this snapshot's
    written-out layers, input trees and checkpoint images gone."""
    from snapbuild.rootfs import MARKER as LAYER_MARKER
    from snapbuild.rootfs import forget_layer
    from snapbuild.runtime.container import read_image
    from snapbuild.runtime.layout import images_root, tree_dir
    from snapbuild.runtime.trees import discard

    spec = runtime.server
    root = Path(spec.run_root)
    from snapbuild.runtime import mounts

    for digest in spec.inputs.values():
        for point in mounts.mount_points_of(tree_dir(root, digest)):  # a host server's `mounts:` of it
            mounts.unmount(point)
        discard(tree_dir(root, digest))  # a tree mounted from its image: unmounted, its image file deleted
    shutil.rmtree(tree_dir(images_root(spec.run_root), runtime.images_tree), ignore_errors=True)
    for layer in read_image(store.blobs, spec.image)[0]["layers"]:
        hexd = layer["digest"].split(":", 1)[1]
        (root / "layers" / f"{hexd}{LAYER_MARKER}").unlink(missing_ok=True)
        forget_layer(root / "layers" / hexd)
    fresh = work / f"node-{time.monotonic_ns()}"
    return Store(fresh)


def wire_limit(host: str, repo: str, blobs: list[str], dest: Path, jobs: int = 16) -> float:
    """Seconds to GET ``blobs`` from the registry at ``host`` with ``jobs`` parallel
    plain HTTP requests and write each, fsync'd, into a new folder ``dest``."""
    from concurrent.futures import ThreadPoolExecutor

    dest.mkdir(parents=True)

    def get(digest: str) -> None:
        with urllib.request.urlopen(f"http://{host}/v2/{repo}/blobs/{digest}", timeout=120) as r, \
                open(dest / digest.split(":", 1)[1], "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())

    t = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(get, blobs))
    took = time.monotonic() - t
    shutil.rmtree(dest, ignore_errors=True)
    return took


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
    runtime = pull(a.ref, store=store)["snapshot"].runtime
    spec = runtime.server
    port = probes.address(spec.ready)[1]
    url = f"http://127.0.0.1:{port}{spec.ready['http'].split(str(port), 1)[1]}"
    name = "snapbuild-bench"
    work = Path(tempfile.mkdtemp(prefix="snapbuild-bench-"))
    run_dir = work / "run"
    run_dir.mkdir()
    times: dict[str, list[float]] = {k: [] for k in ("snapbuild cold", "snapbuild restore", "podman cold",
                                                       "podman restore --import")}
    answers: set[str] = set()
    phases: dict[str, list[dict]] = {}  # each empty-node mode's restore timings, by phase
    firsts: dict[str, list[float]] = {}  # each empty-node mode's time to its first answer
    registry_proc = registry_url = remote_image = None
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
        for mode in EMPTY_NODE:
            times[mode] = []
        times["wire limit: GET + write, 16 parallel"] = []
        times["podman restore --import, empty node"] = []
        from snapbuild.store.snapshot import image_selection, load_config, parse_manifest, referenced_blobs

        manifest_digest = open_registry(registry_url).resolve(parse_ref(a.ref))
        # every blob but the manifest (a few KiB, served from /manifests/)
        manifest = parse_manifest(store.blobs.get(manifest_digest), manifest_digest)
        snapshot_blobs = referenced_blobs(manifest)
        # A node that mounts tree images needs only these: the wire limit GETs what the pulls do.
        imaged_blobs = sorted(image_selection(store.blobs, manifest, load_config(store.blobs, manifest))
                              or snapshot_blobs)
        wire_blobs = snapshot_blobs
        repo = f"bench/{parse_ref(a.ref).name}"
    sh("podman", "rm", "-f", name, check=False)
    image = podman_image(store, spec, work)
    full_image = None

    def warm_and_export(img: str, export: Path, inputs_in_image: bool = False) -> float:
        """Podman's checkpoint of the same warm container: started, warmed as the recipe
        says, exported once. Returns the seconds the export took."""
        sh(*podman_run_args(store, spec, img, run_dir, name, inputs_in_image))
        wait_http(url)
        for _ in range(3):  # the reference recipes' warm-up: three POST /infer
            infer(port)
        t = time.monotonic()
        sh("podman", "container", "checkpoint", "--export", str(export), "--compress", "zstd", name)
        took = time.monotonic() - t
        sh("podman", "rm", "-f", name)
        return took

    try:
        export = work / "checkpoint.tar.zst"
        export_s = warm_and_export(image, export)
        export_bytes = export.stat().st_size
        if a.empty_node:
            full_image = podman_full_image(store, spec, work)
            remote_image = f"{host}/bench/podman-full:{full_image.rsplit(':', 1)[1]}"
            t = time.monotonic()
            sh("podman", "push", "-q", "--tls-verify=false", full_image, f"docker://{remote_image}")
            print(f"podman push of the image with its inputs: {time.monotonic() - t:.1f}s", file=sys.stderr)
            full_export = work / "checkpoint-full.tar.zst"
            warm_and_export(full_image, full_export, inputs_in_image=True)

        for i in range(a.runs):
            for mode in times:
                t0 = time.monotonic()
                if mode == "podman restore --import, empty node":
                    # Nothing of it on the node: both images go, the base layers they share too.
                    for img in (full_image, image):
                        sh("podman", "rmi", "-f", sh("podman", "image", "inspect", "--format", "{{.Id}}", img))
                    t0 = time.monotonic()
                    sh("podman", "pull", "-q", "--tls-verify=false", remote_image)
                    sh("podman", "tag", remote_image, full_image)  # the name the export refers to
                    sh("podman", "container", "restore", "--import", str(full_export), "--name", name)
                    wait_http(url)
                    times[mode].append(time.monotonic() - t0)
                    answers.add(infer(port))
                    sh("podman", "rm", "-f", "-t", "0", name)
                    sh("podman", "load", "-q", "-i", str(work / "image.tar"))  # for the other modes
                elif mode == "wire limit: GET + write, 16 parallel":
                    times[mode].append(wire_limit(host, repo, wire_blobs, work / f"wire-{i}"))
                elif mode in EMPTY_NODE:
                    node = empty_node(runtime, store, work)
                    saved = {k: os.environ.get(k) for k in EMPTY_NODE[mode]}
                    os.environ.update(EMPTY_NODE[mode])
                    first = FirstAnswer(port)
                    try:
                        total, out, _ = _once(a.ref, "restore", node, registry_url, spec,
                                              before_stop=lambda m=mode, f=first: (firsts.setdefault(
                                                  m, []).append(f.seconds() or float("nan")),
                                                  answers.add(infer(port))))
                    finally:
                        for k, v in saved.items():
                            if v is None:
                                os.environ.pop(k)
                            else:
                                os.environ[k] = v
                    times[mode].append(total)
                    phases.setdefault(mode, []).append(out["timings"])
                    if out.get("tree_images") == "used":
                        wire_blobs = imaged_blobs
                    shutil.rmtree(node.home, ignore_errors=True)
                elif mode.startswith("snapbuild"):
                    total, out, _ = _once(a.ref, mode.split()[1], store, None, spec,
                                          before_stop=lambda: answers.add(infer(port)))
                    if out["mode"] != mode.split()[1]:
                        print(f"note: {mode} fell back: {out['reason']}", file=sys.stderr)
                    times[mode].append(total)
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
        for img in (image, full_image, remote_image):
            if img:
                sh("podman", "rmi", "-f", img, check=False)
        shutil.rmtree(work, ignore_errors=True)

    result = {"ref": a.ref, "runs": a.runs, "modes": {k: summary(v) for k, v in times.items()},
              "podman_export_s": round(export_s, 3), "podman_export_bytes": export_bytes,
              "answers_match": len(answers) == 1,
              "snapbuild_checkpoint_images_bytes": runtime.stats.get("images_bytes")}
    result["empty_node_phases_median_s"] = {
        mode: {k: round(statistics.median(t.get(k, 0) for t in rows), 3) for k in rows[0] if k.endswith("_s")}
        for mode, rows in phases.items()}
    result["empty_node_first_answer"] = {mode: summary(v) for mode, v in firsts.items()}
    med = {k: v["median"] for k, v in result["modes"].items()}
    result["ratios"] = {
        "snapbuild restore vs snapbuild cold": round(med["snapbuild cold"] / med["snapbuild restore"], 3),
        "podman restore vs podman cold": round(med["podman cold"] / med["podman restore --import"], 3),
        "snapbuild restore vs podman restore": round(med["podman restore --import"] / med["snapbuild restore"], 3),
    }
    if "snapbuild restore, empty node" in med:
        result["ratios"]["snapbuild restore on an empty node vs podman restore"] = round(
            med["podman restore --import"] / med["snapbuild restore, empty node"], 3)
        result["ratios"]["both on an empty node: snapbuild vs podman"] = round(
            med["podman restore --import, empty node"] / med["snapbuild restore, empty node"], 3)
        for mode in list(EMPTY_NODE)[1:]:
            result["ratios"][f"empty node: straight out vs {mode.split(', ', 2)[2]}"] = round(
                med[mode] / med["snapbuild restore, empty node"], 3)
        result["empty_node_multiple_of_wire_limit"] = round(
            med["snapbuild restore, empty node"] / med["wire limit: GET + write, 16 parallel"], 2)
        first = {k: v["median"] for k, v in result["empty_node_first_answer"].items()}
        result["empty_node_first_answer_multiples"] = {
            mode: {"of podman restore, image local": round(v / med["podman restore --import"], 2),
                   "of the wire limit": round(v / med["wire limit: GET + write, 16 parallel"], 2)}
            for mode, v in first.items()}
        result["snapshot_blob_bytes"] = sum(store.blobs.size(d) for d in wire_blobs)
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{a.ref}: {a.runs} runs per mode, alternated; seconds from the command's start to ready "
          f"(page cache warm; {os.cpu_count()} CPUs)")
    print(f"  {'mode':<58}{'median':>8}{'min':>8}{'max':>8}")
    for k, v in result["modes"].items():
        print(f"  {k:<58}{v['median']:>8.3f}{v['min']:>8.3f}{v['max']:>8.3f}")
    for k, v in result["ratios"].items():
        print(f"  {k}: " + (f"{v:.2f}x faster" if v >= 1 else f"{1 / v:.2f}x slower"))
    print(f"  podman checkpoint --export: {result['podman_export_s']:.2f}s, "
          f"{(result['podman_export_bytes'] or 0) / 2**20:.1f} MiB; snapbuild checkpoint images: "
          f"{(result['snapbuild_checkpoint_images_bytes'] or 0) / 2**20:.1f} MiB")
    for mode, row in result["empty_node_phases_median_s"].items():
        print(f"  {mode}, by phase (medians): " + ", ".join(f"{k} {v:.2f}s" for k, v in row.items()))
    for mode, v in result["empty_node_first_answer"].items():
        m = result["empty_node_first_answer_multiples"][mode]
        print(f"  {mode}, first answer (median): {v['median']:.3f}s = {m['of podman restore, image local']}x "
              f"podman's local restore, {m['of the wire limit']}x the wire limit")
    if "empty_node_multiple_of_wire_limit" in result:
        print(f"  empty-node restore = {result['empty_node_multiple_of_wire_limit']}x the wire limit "
              f"({result['snapshot_blob_bytes'] / 2**20:.0f} MiB of blobs)")
    print(f"  answers identical across modes: {'yes' if result['answers_match'] else 'NO'}")


if __name__ == "__main__":
    main()
