"""Registries that attack the reader, not the tree: endless bodies, bodies longer than
their descriptor, gzip bombs, answers that drip one byte every few seconds, huge
manifests, and a zstd chunk whose frame header declares 1 GiB. Each runs the real
`snapbuild-runner pull` against a hostile registry on 127.0.0.1 (hostile_registry.py)
and bounds what it costs the node: the child's peak memory (its own rusage), and its
wall time where the registry stalls (the deadline of registry/bounds.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from hostile_registry import serve
from testkit import measured
from test_hostile import Forge  # valid snapshots, made by hand

from snapbuild.registry.bounds import DOCUMENT_MAX, deadline_for
from snapbuild.store.chunks import CHUNK_SIZE, MEDIA_TYPES

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
MEMORY_BOUND = 300 << 20  # a pull of this small snapshot, whatever the registry sends
FILE = os.urandom(2 << 20)  # one raw chunk of 2 MiB


def run_child(args: list[str], env: dict, kill_after: float) -> tuple[int, str, int, float]:
    """Run a command to its end (killed after ``kill_after`` s); (exit status, stderr,
    peak RSS in bytes, wall seconds), measured by testkit.measured."""
    with open(env["SNAPBUILD_HOME"] + ".err", "w+") as err:
        code, wall, peak = measured(args, env=env, timeout=kill_after, stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        return code, err.read(), peak, wall


@pytest.fixture
def snapshot(tmp_path):
    """A valid snapshot in a forge's store: (forge, manifest digest, its blobs by role)."""
    forge = Forge(tmp_path / "forge")
    tree = forge.tree(forge.file("data.bin", FILE))
    manifest = forge.snapshot({"app": tree})
    import json

    m = json.loads(forge.blobs.get(manifest))
    chunk = next(x["digest"] for x in m["layers"] if x["mediaType"] == MEDIA_TYPES["raw"])
    return forge, manifest, {"manifest": manifest, "config": m["config"]["digest"], "tree": tree, "chunk": chunk}


@pytest.fixture
def registry(snapshot):
    forge, manifest, _ = snapshot
    server = serve(forge.blobs)
    server.tags["evil:1"] = manifest
    yield server
    server.stop()


def pull(server, tmp_path: Path, kill_after: float = 90, tag: str = "evil:1") -> tuple[int, str, int, float]:
    tmp_path.mkdir(exist_ok=True)
    home = tmp_path / f"node-{time.monotonic_ns()}"
    env = {**os.environ, "SNAPBUILD_HOME": str(home)}
    return run_child([str(BIN / "snapbuild-runner"), "pull", tag, "--registry", server.url, "--dest",
                      str(home) + "-dest"], env, kill_after)


def test_an_honest_answer_from_the_hostile_server_pulls(registry, tmp_path):
    """The server itself is a working registry: the refusals below are the client's."""
    code, err, rss, _ = pull(registry, tmp_path)
    assert code == 0, err
    dest = next(tmp_path.glob("node-*-dest"))
    assert (dest / "app" / "data.bin").read_bytes() == FILE
    assert rss < MEMORY_BOUND, f"peak memory {rss >> 20} MiB"


@pytest.mark.parametrize("role, mode, words", [
    ("chunk", "endless", "cut off and refused"),
    ("chunk", "longer", "cut off and refused"),
    ("chunk", "gzip-bomb", "gzip-encoded (Content-Encoding)"),
    ("manifest", "endless", "the most a document may hold; cut off and refused"),
    ("config", "longer", "cut off and refused"),
    ("chunk", "redirect", "the most a document may hold; cut off and refused"),
])
def test_what_a_registry_sends_cannot_exhaust_the_node_s_memory(role, mode, words, snapshot, registry, tmp_path):
    _, _, digests = snapshot
    registry.hostile[digests[role]] = mode
    code, err, rss, wall = pull(registry, tmp_path)
    assert code == 5, (code, err)
    assert words in err and digests[role] in err, err
    assert registry.url in err or "a redirect from http://127.0.0.1" in err, err
    assert "Traceback" not in err
    assert rss < MEMORY_BOUND, f"peak memory {rss >> 20} MiB"
    assert not any(Path(tmp_path).glob("node-*-dest/app/*")), "nothing written out"


def test_a_registry_that_drips_is_cut_off_at_the_deadline(snapshot, tmp_path):
    """One byte every few seconds, in a config's body and in a manifest's headers: each
    read ends within its deadline (the two pulls run at once, from two registries)."""
    import threading

    forge, manifest, digests = snapshot
    servers = {"drip": serve(forge.blobs), "drip-headers": serve(forge.blobs)}
    servers["drip"].hostile[digests["config"]] = "drip"
    servers["drip-headers"].hostile[digests["manifest"]] = "drip-headers"
    deadline = deadline_for(DOCUMENT_MAX)
    limit = deadline + 20  # the child's start and the pull's other requests
    results = {}

    def run(mode: str) -> None:
        servers[mode].tags["evil:1"] = manifest
        results[mode] = pull(servers[mode], tmp_path / mode, kill_after=limit + 60)

    try:
        threads = [threading.Thread(target=run, args=(mode,)) for mode in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for server in servers.values():
            server.stop()
    for mode, (code, err, rss, wall) in results.items():
        assert code == 7 and "deadline" in err and servers[mode].url in err, (mode, code, err)
        assert "Traceback" not in err
        assert wall < limit, f"{mode}: the pull took {wall:.0f} s; the deadline is {deadline:.0f} s"
        assert rss < MEMORY_BOUND, f"{mode}: peak memory {rss >> 20} MiB"


def test_a_zstd_chunk_that_declares_1_gib_is_refused_before_it_is_decompressed(tmp_path):
    """A chunk of a few KiB whose frame header declares 1 GiB (the tree records 4 MiB):
    zstd would allocate what the header declares."""
    forge = Forge(tmp_path / "forge")
    c = zstandard.ZstdCompressor(level=1).compressobj(size=1 << 30)
    zeros = bytes(1 << 20)
    frame = b"".join(c.compress(zeros) for _ in range(1 << 10)) + c.flush()
    ref = {"enc": "zstd", "digest": forge.blobs.put(frame), "size": CHUNK_SIZE}
    entry = {"path": "big", "type": "file", "mode": 0o644, "size": CHUNK_SIZE, "chunks": [ref],
             "digest": "sha256:" + hashlib.sha256(bytes(CHUNK_SIZE)).hexdigest()}
    server = serve(forge.blobs)
    server.tags["evil:1"] = forge.snapshot({"app": forge.tree(entry)})
    try:
        code, err, rss, _ = pull(server, tmp_path)
    finally:
        server.stop()
    assert code == 5 and f"declares {1 << 30} bytes, where the tree records {CHUNK_SIZE}" in err, (code, err)
    assert rss < MEMORY_BOUND, f"peak memory {rss >> 20} MiB"


def test_an_s3_registry_is_read_within_the_same_bounds(s3_bucket, tmp_path):
    """The real S3 server (moto) holding an object longer than its descriptor, then one
    stored with a Content-Encoding: both refused; the right one streams into a file."""
    from snapbuild.errors import IntegrityError
    from snapbuild.registry import open_registry

    client, bucket = s3_bucket
    reg = open_registry(f"s3://{bucket}/p")
    data = os.urandom(1000)
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    key = f"p/blobs/sha256/{d[7:]}"
    client.put_object(Bucket=bucket, Key=key, Body=data + bytes(5000))
    with pytest.raises(IntegrityError, match=f"blob {d} in s3://{bucket}/p: the answer says it holds 6000 bytes, "
                                             "where its descriptor gives 1000"):
        reg.get_blob("n", d, size=1000)
    client.put_object(Bucket=bucket, Key=key, Body=data, ContentEncoding="gzip")
    with pytest.raises(IntegrityError, match="gzip-encoded"):
        reg.get_blob("n", d, size=1000)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    with open(tmp_path / "blob", "w+b") as f:
        assert reg.get_blob("n", d, size=1000, into=f) == b""
    assert (tmp_path / "blob").read_bytes() == data
