#!/usr/bin/env python3
"""Registry transfers: push and pull throughput on each backend, and what a second
version costs to push when only the app code changed.

    python tests/bench/bench_registries.py [--ref torch-mlp-mmap:dev] [--runs 3] [--backends file,s3,oci] [--json]

REF must be in the local registry (build it first). The backends run here, on
127.0.0.1, started by this script: file:// (a folder on the same disk as the store),
s3:// (moto's standalone server) and oci:// (Debian's docker-registry, filesystem
storage). Each run pushes REF to an empty destination (a new folder, bucket or
repository) and pulls it back into an empty store; figures are medians of --runs,
in MiB/s of the snapshot's blob bytes. file:// hard-links blobs from the store, so its
push measures checking and linking, not copying.

The second version: the recipe of REF (a copy of recipes/examples/torch-mlp-mmap.yaml
and its app folder, in a temporary folder) is built again with one comment added to
the server's code, which changes the app step and so the warm-up and checkpoint
too; then both versions are pushed to an empty oci:// repository, one after the
other, and the bytes the second push sends are compared with the first's.
Needs root (the checkpoint), CRIU, docker-registry and moto (ci/setup.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from conftest import _serve_registry  # noqa: E402  (the tests' registry helper)

from snapbuild.build import build  # noqa: E402
from snapbuild.registry import default_registry_url, open_registry, parse_ref  # noqa: E402
from snapbuild.registry.transfer import fetch, push  # noqa: E402
from snapbuild.store import Store  # noqa: E402
from snapbuild.store.snapshot import parse_manifest, referenced_blobs  # noqa: E402

MiB = 1 << 20


def moto_server(env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def snapshot_of(store: Store, ref: str) -> tuple[str, list[str], int]:
    reg = open_registry(default_registry_url(store.home))
    r = parse_ref(ref)
    digest = reg.resolve(r)
    blobs = referenced_blobs(parse_manifest(store.blobs.get(digest), digest))
    return digest, blobs, sum(store.blobs.size(d) for d in blobs)


class _Done(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="torch-mlp-mmap:dev")
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "examples" / "torch-mlp-mmap.yaml"),
                    help="the recipe REF was built from (for the second version)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backends", default="file,s3,oci", help="which to measure (comma-separated)")
    ap.add_argument("--synthetic", type=int, metavar="MIB",
                    help="instead of REF, a snapshot of one random file of MIB MiB (whole 4 MiB chunks: "
                         "bandwidth, not per-blob overhead); skips the second version")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    store = Store()
    work = Path(tempfile.mkdtemp(prefix="snapbuild-bench-reg-"))
    if a.synthetic:
        (work / "synthetic" / "data").mkdir(parents=True)
        (work / "synthetic" / "data" / "random.bin").write_bytes(os.urandom(a.synthetic * MiB))
        (work / "synthetic" / "recipe.yaml").write_text(
            'name: synthetic\nsteps:\n  data: {kind: files, root: data}\npublish: {tag: "synthetic:v1"}\n')
        [res] = build(work / "synthetic" / "recipe.yaml", store=store)
        assert res.ok
        a.ref = "synthetic:v1"
    digest, blobs, total = snapshot_of(store, a.ref)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    (work / "registry").mkdir()
    reg_proc, host = _serve_registry(work / "registry")
    s3_proc, s3_url = moto_server(os.environ)
    os.environ["SNAPBUILD_S3_ENDPOINT"] = s3_url
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_url)
    result = {"ref": a.ref, "digest": digest, "blobs": len(blobs), "bytes": total, "runs": a.runs, "backends": {}}
    try:
        for kind in a.backends.split(","):
            pushes, pulls = [], []
            for i in range(a.runs):
                if kind == "file":
                    url = f"file://{work / f'file-{i}'}"
                elif kind == "s3":
                    s3.create_bucket(Bucket=f"bench-{i}")
                    url = f"s3://bench-{i}/snaps"
                else:
                    url = f"oci://{host}/bench{i}"
                out = push(open_registry(url), parse_ref(a.ref), digest, blobs, store.blobs)
                assert out["blobs_sent"] == len(blobs)
                pushes.append(out["seconds"])
                node = Store(work / f"node-{kind}-{i}")
                t = time.monotonic()
                got = fetch(open_registry(url), parse_ref(a.ref), node.blobs)
                pulls.append(time.monotonic() - t)
                assert got["blobs_fetched"] == len(blobs)
                shutil.rmtree(node.home)
                print(f"{kind:<5} run {i + 1}/{a.runs}: push {pushes[-1]:.2f}s, pull {pulls[-1]:.2f}s", file=sys.stderr)
            result["backends"][kind] = {
                "push_s": round(statistics.median(pushes), 3), "pull_s": round(statistics.median(pulls), 3),
                "push_mib_s": round(total / MiB / statistics.median(pushes), 1),
                "pull_mib_s": round(total / MiB / statistics.median(pulls), 1)}

        if a.synthetic:
            raise _Done
        # A second version that changes only the app code.
        src = Path(a.recipe)
        copy = work / "recipe"
        copy.mkdir()
        shutil.copy(src, copy / src.name)
        shutil.copytree(src.parent / "torch-mlp", copy / "torch-mlp")
        with open(copy / "torch-mlp" / "serve.py", "a") as f:
            f.write("# version 2\n")
        t = time.monotonic()
        [v2] = build(copy / src.name, store=store, tag="bench-app-v2", jobs=2)
        assert v2.ok, {n: r.error for n, r in v2.steps.items() if r.error}
        build_s = time.monotonic() - t
        v2_blobs = referenced_blobs(parse_manifest(store.blobs.get(v2.snapshot), v2.snapshot))
        url = f"oci://{host}/second"
        from snapbuild.registry import oci as oci_registry

        oci_registry._SEEN.clear()  # as from a fresh process: no cross-repository mounts of the runs above
        first = push(open_registry(url), parse_ref(a.ref), digest, blobs, store.blobs)
        second = push(open_registry(url), parse_ref(f"{parse_ref(a.ref).name}:app-v2"), v2.snapshot, v2_blobs,
                      store.blobs)
        changed = {s: r.status for s, r in v2.steps.items() if r.status == "built"}
        result["second_version"] = {
            "rebuilt_steps": sorted(changed), "build_s": round(build_s, 2),
            "first_push_bytes": first["bytes_sent"], "second_push_bytes": second["bytes_sent"],
            "second_push_blobs": second["blobs_sent"], "ratio": round(second["bytes_sent"] / first["bytes_sent"], 4),
            "new_blob_bytes": sum(store.blobs.size(d) for d in set(v2_blobs) - set(blobs))}
    except _Done:
        pass
    finally:
        reg_proc.terminate()
        s3_proc.terminate()
        shutil.rmtree(work, ignore_errors=True)

    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{a.ref}: {result['blobs']} blobs, {total / MiB:.1f} MiB; medians of {a.runs} runs, loopback")
    print(f"  {'backend':<8}{'push s':>8}{'MiB/s':>8}{'pull s':>8}{'MiB/s':>8}")
    for kind, b in result["backends"].items():
        print(f"  {kind:<8}{b['push_s']:>8.2f}{b['push_mib_s']:>8.1f}{b['pull_s']:>8.2f}{b['pull_mib_s']:>8.1f}")
    sv = result.get("second_version")
    if sv:
        print(f"  second version (app code changed; rebuilt {', '.join(sv['rebuilt_steps'])} in {sv['build_s']:.1f}s): "
              f"push sent {sv['second_push_bytes'] / MiB:.1f} MiB in {sv['second_push_blobs']} blobs, "
              f"{sv['ratio']:.1%} of the first push ({sv['first_push_bytes'] / MiB:.1f} MiB)")


if __name__ == "__main__":
    main()
