"""One contract, every registry backend, each against the real thing on 127.0.0.1:
file:// (an OCI layout on disk), s3:// (moto's standalone S3 server) and oci:// (Debian's
docker-registry, CNCF distribution 2.8, without auth, with Basic auth, and with Bearer
tokens from a small token service of the tests' own: see tokenserver.py).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.errors import IntegrityError, NotFound, RegistryError
from snapbuild.registry import open_registry, parse_ref
from snapbuild.registry.transfer import fetch, push
from snapbuild.store import Store
from snapbuild.store.snapshot import load_config, parse_manifest, referenced_blobs

from testkit import free_port

pytestmark = pytest.mark.integration

BACKENDS = ["file", "s3", "oci", "oci-auth", "oci-token"]


@pytest.fixture(params=BACKENDS)
def registry_url(request, tmp_path, monkeypatch):
    """A fresh, empty registry of each kind; yields (url, corrupt) where corrupt(digest)
    changes the bytes the registry holds for a blob."""
    kind = request.param
    if kind == "file":
        root = tmp_path / "reg"

        def corrupt(digest, name):
            p = root / name / "blobs" / "sha256" / digest.split(":")[1]
            data = p.read_bytes()
            p.unlink()  # a new file: the store's copy is a hard link to the old one
            p.write_bytes(b"rotten" + data[6:])

        yield f"file://{root}", corrupt
    elif kind == "s3":
        s3, bucket = request.getfixturevalue("s3_bucket")

        def corrupt(digest, name):
            key = f"team/blobs/sha256/{digest.split(':')[1]}"
            s3.put_object(Bucket=bucket, Key=key, Body=b"rotten" + s3.get_object(Bucket=bucket, Key=key)["Body"].read()[6:])

        yield f"s3://{bucket}/team", corrupt
    else:
        if kind == "oci":
            host = request.getfixturevalue("oci_registry")
        else:
            if kind == "oci-auth":
                host, user, password = request.getfixturevalue("oci_registry_auth")
            else:
                host, user, password, _ = request.getfixturevalue("oci_registry_token")
            monkeypatch.setenv("SNAPBUILD_REGISTRY_USERNAME", user)
            monkeypatch.setenv("SNAPBUILD_REGISTRY_PASSWORD", password)
        repo = f"t{time.monotonic_ns()}"  # a fresh repository prefix per test

        def corrupt(digest, name):
            hexd = digest.split(":")[1]
            found = list(Path(request.getfixturevalue("tmp_path_factory").getbasetemp()).glob(
                f"registry*/data/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"))
            assert found, "the blob's file in the registry's storage"
            for p in found:
                p.write_bytes(b"rotten" + p.read_bytes()[6:])

        yield f"oci://{host}/{repo}", corrupt


@pytest.fixture
def built(recipe, project, store):
    """A small snapshot in the local store: (store, manifest digest, blobs, app folder)."""
    (project / "app").mkdir()
    (project / "app" / "serve.py").write_text("print('v1')\n")
    (project / "app" / "big.bin").write_bytes(os.urandom(6 << 20))  # two chunks
    path = recipe("""
        name: contract
        steps:
          app: {kind: files, root: app}
          data: {kind: command, needs: [app], run: "cat $SNAPBUILD_INPUTS/app/serve.py > out.txt", outputs: [out.txt]}
        publish: {tag: "contract:v1", steps: [app, data]}
    """)
    [res] = build(path, store=store)
    assert res.ok
    manifest = parse_manifest(store.blobs.get(res.snapshot), res.snapshot)
    return store, res.snapshot, referenced_blobs(manifest), path


def test_push_then_pull_round_trip(registry_url, built, tmp_path):
    url, _ = registry_url
    store, digest, blobs, _ = built
    reg = open_registry(url)
    first = push(reg, parse_ref("contract:v1"), digest, blobs, store.blobs)
    assert first["blobs_sent"] + first["blobs_mounted"] == len(blobs) and first["bytes_sent"] > 6 << 20
    assert reg.resolve(parse_ref("contract:v1")) == digest
    assert reg.resolve(parse_ref(f"contract@{digest}")) == digest
    assert reg.names() == ["contract"] and reg.tagged("contract") == [("v1", digest)]

    again = push(reg, parse_ref("contract:v2"), digest, blobs, store.blobs)
    assert again["blobs_sent"] == 0, "only missing blobs are sent"
    assert sorted(reg.tagged("contract")) == [("v1", digest), ("v2", digest)]

    node = Store(tmp_path / "node")
    got = fetch(open_registry(url), parse_ref("contract:v1"), node.blobs)
    assert got["digest"] == digest and got["blobs_fetched"] == len(blobs)
    assert load_config(node.blobs, got["manifest"])["name"] == "contract"
    assert all(node.blobs.verify(d) for d in blobs)


def test_a_second_version_sends_only_what_changed(registry_url, built):
    url, _ = registry_url
    store, digest, blobs, path = built
    reg = open_registry(url)
    push(reg, parse_ref("contract:v1"), digest, blobs, store.blobs)
    (path.parent / "app" / "serve.py").write_text("print('v2')\n")
    [res] = build(path, store=store)
    new_blobs = referenced_blobs(parse_manifest(store.blobs.get(res.snapshot), res.snapshot))
    second = push(reg, parse_ref("contract:v2"), res.snapshot, new_blobs, store.blobs)
    assert 0 < second["blobs_sent"] < len(new_blobs)
    assert second["bytes_sent"] < 64 << 10, "the 6 MiB file is not sent again"


def test_unknown_tags_and_names_are_not_found(registry_url, built):
    url, _ = registry_url
    store, digest, blobs, _ = built
    reg = open_registry(url)
    push(reg, parse_ref("contract:v1"), digest, blobs, store.blobs)
    with pytest.raises(NotFound, match="v9"):
        reg.resolve(parse_ref("contract:v9"))
    with pytest.raises(NotFound):
        reg.resolve(parse_ref("nothing:v1"))
    with pytest.raises(NotFound):
        reg.resolve(parse_ref("contract@sha256:" + "0" * 64))


def test_a_corrupt_blob_is_refetched_once_then_refused(registry_url, built, tmp_path):
    url, corrupt = registry_url
    store, digest, blobs, _ = built
    reg = open_registry(url)
    push(reg, parse_ref("contract:v1"), digest, blobs, store.blobs)
    victim = max(blobs, key=store.blobs.size)  # a chunk of the big file
    corrupt(victim, "contract")
    node = Store(tmp_path / "node")
    with pytest.raises(IntegrityError, match=f"blob {victim}.* is corrupt"):
        fetch(open_registry(url), parse_ref("contract:v1"), node.blobs)
    assert not node.blobs.has(victim) and not node.blobs.has(digest), "nothing unverified, and no manifest"


def test_an_interrupted_push_shows_no_tag_and_the_next_push_completes(registry_url, built):
    url, _ = registry_url
    store, digest, blobs, _ = built
    reg = open_registry(url)
    real_put, sent = reg.put_blob, []

    def dying_put(name, d, path):
        if len(sent) == 2:
            raise RegistryError("connection lost (simulated)")
        sent.append(d)
        real_put(name, d, path)

    reg.put_blob = dying_put
    with pytest.raises(RegistryError, match="simulated"):
        push(reg, parse_ref("contract:v1"), digest, blobs, store.blobs, jobs=1)
    fresh = open_registry(url)
    with pytest.raises(NotFound):
        fresh.resolve(parse_ref("contract:v1"))
    done = push(fresh, parse_ref("contract:v1"), digest, blobs, store.blobs)
    assert done["blobs_sent"] + done["blobs_mounted"] == len(blobs) - 2, "the blobs that made it are not sent again"
    assert fresh.resolve(parse_ref("contract:v1")) == digest


def test_deleting_a_tag(registry_url, built):
    url, _ = registry_url
    store, digest, blobs, _ = built
    reg = open_registry(url)
    push(reg, parse_ref("contract:v1"), digest, blobs, store.blobs)
    reg.delete(parse_ref("contract:v1"))
    with pytest.raises(NotFound):
        reg.resolve(parse_ref("contract:v1"))


@pytest.fixture(params=["basic", "token"])
def auth_registry(request):
    """(host, user, password) of the registry with Basic auth, then of the one with tokens."""
    if request.param == "basic":
        return request.getfixturevalue("oci_registry_auth")
    return request.getfixturevalue("oci_registry_token")[:3]


def test_wrong_credentials_and_no_credentials_are_refused(auth_registry, monkeypatch):
    host, user, _ = auth_registry
    monkeypatch.setenv("SNAPBUILD_REGISTRY_USERNAME", user)
    monkeypatch.setenv("SNAPBUILD_REGISTRY_PASSWORD", "wrong")
    with pytest.raises(RegistryError, match="not authorized"):
        open_registry(f"oci://{host}/x").resolve(parse_ref("contract:v1"))
    monkeypatch.delenv("SNAPBUILD_REGISTRY_USERNAME")
    monkeypatch.delenv("SNAPBUILD_REGISTRY_PASSWORD")
    monkeypatch.setenv("DOCKER_CONFIG", "/nonexistent")
    with pytest.raises(RegistryError, match="not authorized"):
        open_registry(f"oci://{host}/x").resolve(parse_ref("contract:v1"))


def test_credentials_come_from_the_standard_auth_file(oci_registry_auth, monkeypatch, tmp_path):
    import base64
    import json

    host, user, password = oci_registry_auth
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    with pytest.raises(NotFound):  # authorized: the answer is about the snapshot, not the credentials
        open_registry(f"oci://{host}/x").resolve(parse_ref("contract:v1"))


def test_bearer_tokens_carry_the_scopes_each_call_needs(oci_registry_token, built, monkeypatch):
    """The token flow for real: the registry only accepts what the token grants, so a
    push, a cross-repository mount, a pull and the catalog each ask for their scope."""
    host, user, password, tokens = oci_registry_token
    monkeypatch.setenv("SNAPBUILD_REGISTRY_USERNAME", user)
    monkeypatch.setenv("SNAPBUILD_REGISTRY_PASSWORD", password)
    store, digest, blobs, _ = built
    prefix = f"tok{time.monotonic_ns()}"
    tokens.grants.clear()
    reg = open_registry(f"oci://{host}/{prefix}")
    push(reg, parse_ref("contract:v1"), digest, blobs, store.blobs)
    push(reg, parse_ref("copy:v1"), digest, blobs, store.blobs)  # mounts from contract
    assert reg.mounted > 0
    granted = {s for g in tokens.grants for s in g}
    assert f"repository:{prefix}/contract:pull,push" in granted
    assert f"repository:{prefix}/contract:pull" in granted, "a mount asks to read the source repository"
    assert reg.names() == ["contract", "copy"] and "registry:catalog:*" in {s for g in tokens.grants for s in g}
    assert open_registry(f"oci://{host}/{prefix}").resolve(parse_ref("copy:v1")) == digest


def test_a_credential_helper_logs_in_for_push_and_pull(auth_registry, built, monkeypatch, tmp_path):
    """The real registry with htpasswd auth, then the one with Bearer tokens, reached
    with credentials from a stand-in docker-credential helper named in credHelpers
    (how ECR, GCR and ACR are reached), for a push and for a pull into a new store."""
    import json
    import sys

    host, user, password = auth_registry
    for var in ("SNAPBUILD_REGISTRY_USERNAME", "SNAPBUILD_REGISTRY_PASSWORD", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "bin").mkdir()
    asked = tmp_path / "asked"
    helper = tmp_path / "bin" / "docker-credential-standin"
    helper.write_text(f"""#!{sys.executable}
import json, sys
host = sys.stdin.read().strip()
open({str(asked)!r}, "a").write(sys.argv[1] + " " + host + "\\n")
if host != {host!r}:
    print("credentials not found"); sys.exit(1)
print(json.dumps({{"ServerURL": host, "Username": {user!r}, "Secret": {password!r}}}))
""")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    (tmp_path / "dc").mkdir()
    (tmp_path / "dc" / "config.json").write_text(json.dumps({"credHelpers": {host: "standin"}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))

    store, digest, blobs, _ = built
    url = f"oci://{host}/helper{time.monotonic_ns()}"
    push(open_registry(url), parse_ref("contract:v1"), digest, blobs, store.blobs)
    from snapbuild.runner.pull import pull

    got = pull(f"{url}/contract:v1", store=Store(tmp_path / "node"))
    assert got["digest"] == digest and got["blobs_fetched"] > 0
    assert asked.read_text().splitlines()[0] == f"get {host}", "the helper was asked, with docker's protocol"
    (tmp_path / "dc" / "config.json").write_text(json.dumps({"credHelpers": {host: "missing"}}))
    with pytest.raises(RegistryError, match="docker-credential-missing is not on PATH"):
        open_registry(url).resolve(parse_ref("contract:v1"))


def test_a_registry_that_is_down_fails_clearly_after_bounded_retries():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RegistryError, match=r"resolving contract:v1 at oci://127.0.0.1:\d+/x: .*tried 4 times"):
        open_registry(f"oci://127.0.0.1:{port}/x").resolve(parse_ref("contract:v1"))
    assert time.monotonic() - t0 < 30, "retries are bounded"


def test_commands_push_pull_ls_rm_and_build_push(oci_registry, s3_server, aws_env, built, run_cli, tmp_path):
    store, digest, _, path = built
    bucket = f"ci-{time.monotonic_ns()}"
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    oci, s3 = f"oci://{oci_registry}/ci{time.monotonic_ns()}", f"s3://{bucket}/snaps"
    r = run_cli("build", path, "--push", oci, "--push", s3, "--s3-endpoint", s3_server, "--json")
    assert r.code == 0, r
    pushed = r.json()["pushed"]
    assert [p["registry"] for p in pushed] == [oci, s3] and all(p["digest"] == digest for p in pushed)
    r = run_cli("ls", "--registry", oci, "--json")
    assert r.json()["snapshots"] == [{"name": "contract", "tag": "v1", "digest": digest}], r

    node = {"SNAPBUILD_HOME": str(tmp_path / "node-home"), "SNAPBUILD_S3_ENDPOINT": s3_server}
    r = run_cli("pull", "contract:v1", "--registry", s3, "--json", env=node)
    assert r.code == 0 and r.json()["blobs_fetched"] > 0, r
    assert " blobs, " not in r.err, "--json: no progress lines"
    r = run_cli("pull", "contract:v1", "--registry", oci, "--progress", "plain",
                env={"SNAPBUILD_HOME": str(tmp_path / "plain-home")})
    assert r.code == 0 and re.search(r"^fetched (\d+)/\1 blobs, [\d.]+ MiB$", r.err, re.M), r
    r = run_cli("inspect", "contract:v1", "--json", env=node)  # now in the node's own registry
    assert r.code == 0 and r.json()["digest"] == digest, r
    r = run_cli("pull", "contract:v1", "--registry", s3, "--json", env=node)
    assert r.json()["blobs_fetched"] == 0, "nothing fetched twice"

    out = tmp_path / "out"
    r = run_cli("pull", "contract:v1", "--registry", oci, "--dest", out, tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(tmp_path / "runner-home")})
    assert r.code == 0, r
    assert (out / "data" / "out.txt").read_text() == "print('v1')\n"

    r = run_cli("push", "contract:v1", oci, "--as", "contract:copy", "--json")
    assert r.code == 0 and r.json()["blobs_sent"] == 0, r
    r = run_cli("rm", "contract:v1", "--registry", s3, "--s3-endpoint", s3_server)
    assert r.code == 0 and "removed contract:v1" in r.out, r
    r = run_cli("inspect", "contract:v1", "--registry", s3, env={"SNAPBUILD_S3_ENDPOINT": s3_server})
    assert r.code == 6 and "no tag 'v1'" in r.err, r
    r = run_cli("push", "contract:v1", "ftp://example/x")
    assert r.code == 2 and "scheme 'ftp' is not supported" in r.err, r


def test_a_process_snapshot_restores_from_an_oci_registry(oci_registry, recipe, store, tmp_path):
    from test_criu_snapshots import counter_recipe
    from snapbuild.runner.restore import run, stop
    from testkit import post

    port = free_port()
    url = f"oci://{oci_registry}/nodes{time.monotonic_ns()}"
    [res] = build(counter_recipe(recipe, port), store=store)
    assert res.ok
    manifest = parse_manifest(store.blobs.get(res.snapshot), res.snapshot)
    push(open_registry(url), parse_ref("counter:v1"), res.snapshot, referenced_blobs(manifest), store.blobs)
    node = Store(tmp_path / "node")
    out = run("counter:v1", registry=url, store=node)
    try:
        assert out["mode"] == "restore", out
        assert post(port, "/count")["count"] == 3
    finally:
        stop(out["pid"])


def test_registry_garbage_collection_keeps_every_chunk_of_a_snapshot(built, tmp_path):
    """Every chunk is a layer of the manifest, so the registry's own gc (`docker-registry
    garbage-collect`) keeps them all, while it does remove a blob nothing references."""
    import subprocess

    from conftest import _serve_registry

    store, digest, blobs, _ = built
    root = tmp_path / "gc-registry"
    root.mkdir()
    proc, host = _serve_registry(root)
    try:
        reg = open_registry(f"oci://{host}/gc")
        push(reg, parse_ref("contract:v1"), digest, blobs, store.blobs)
        orphan = tmp_path / "orphan"
        orphan.write_bytes(b"referenced by no manifest")
        from snapbuild.registry.base import sha256_of

        orphan_digest = sha256_of(orphan.read_bytes())
        reg.put_blob("contract", orphan_digest, orphan)
        assert reg.has_blob("contract", orphan_digest)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    gc = subprocess.run(["docker-registry", "garbage-collect", str(root / "config.yml")], capture_output=True,
                        text=True, timeout=120)
    assert gc.returncode == 0, gc.stderr
    proc, host2 = _serve_registry(root)
    try:
        reg = open_registry(f"oci://{host2}/gc")
        assert not reg.has_blob("contract", orphan_digest), "gc ran and removed what no manifest names"
        got = fetch(reg, parse_ref("contract:v1"), Store(tmp_path / "node").blobs)
        assert got["digest"] == digest and got["blobs_fetched"] == len(blobs)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("kind", ["file", "s3", "oci"])
def test_a_push_killed_at_random_moments_shows_nothing_partial_and_completes_on_rerun(
        kind, request, recipe, project, store, run_cli, tmp_path, monkeypatch):
    import random
    import signal
    import subprocess
    import sys

    (project / "big").mkdir()
    (project / "big" / "w.bin").write_bytes(os.urandom(40 << 20))  # 10 chunks
    [res] = build(recipe('name: big\nsteps:\n  w: {kind: files, root: big}\npublish: {tag: "big:v1"}\n'),
                  store=store)
    if kind == "file":
        url = f"file://{tmp_path / 'dest'}"
    elif kind == "s3":
        _, bucket = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/p"
    else:
        url = f"oci://{request.getfixturevalue('oci_registry')}/kill{time.monotonic_ns()}"
    exe = str(Path(sys.executable).parent / "snapbuild")
    rng = random.Random(7)
    for _ in range(4):
        proc = subprocess.Popen([exe, "push", "big:v1", url, "-j", "2"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reg = open_registry(url)
        try:
            digest = reg.resolve(parse_ref("big:v1"))
        except NotFound:
            continue  # killed before the tag: nothing to see
        got = fetch(reg, parse_ref("big:v1"), Store(tmp_path / f"check-{time.monotonic_ns()}").blobs)
        assert digest == res.snapshot and got["blobs_fetched"] > 0, "a visible tag has all its blobs, verified"
    r = run_cli("push", "big:v1", url, "--json")
    assert r.code == 0, r
    got = fetch(open_registry(url), parse_ref("big:v1"), Store(tmp_path / "node").blobs)
    assert got["digest"] == res.snapshot


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_tag_that_names_a_missing_manifest_is_reported(kind, request, built, tmp_path, monkeypatch):
    """(An OCI registry keeps tags and manifests together: deleting one deletes both.)"""
    store, digest, blobs, _ = built
    if kind == "file":
        url = f"file://{tmp_path / 'reg'}"
        lose = lambda: (tmp_path / "reg" / "contract" / "blobs" / "sha256" / digest.split(":")[1]).unlink()  # noqa: E731
    else:
        s3, bucket = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/p"
        lose = lambda: s3.delete_object(Bucket=bucket, Key=f"p/blobs/sha256/{digest.split(':')[1]}")  # noqa: E731
    push(open_registry(url), parse_ref("contract:v1"), digest, blobs, store.blobs)
    lose()
    with pytest.raises(NotFound, match=f"{digest}.*not in"):
        fetch(open_registry(url), parse_ref("contract:v1"), Store(tmp_path / "node").blobs)


def test_blobs_another_repository_has_are_mounted_not_sent(oci_registry, built, tmp_path):
    store, digest, blobs, _ = built
    url = f"oci://{oci_registry}/mount{time.monotonic_ns()}"
    push(open_registry(url), parse_ref("contract:v1"), digest, blobs, store.blobs)
    other = open_registry(url)
    out = push(other, parse_ref("copy/contract:v1"), digest, blobs, store.blobs)
    assert out["blobs_mounted"] == len(blobs) == other.mounted and out["blobs_sent"] == 0, \
        "every blob mounted from the repository of contract, none sent"
    assert out["bytes_sent"] == 0
    got = fetch(open_registry(url), parse_ref("copy/contract:v1"), Store(tmp_path / "node").blobs)
    assert got["digest"] == digest and got["blobs_fetched"] == len(blobs)


def test_full_references_work_in_every_command_without_registry(oci_registry, s3_server, aws_env, built, run_cli,
                                                                 tmp_path, recipe, store):
    """`push np:1 oci://HOST/team/np:2`, then that reference (and s3://, file://) in pull,
    inspect, sign, rm and the runner's pull, restore and logs: as docker, skopeo, oras
    and crane take them."""
    _, digest, _, _ = built
    team = f"team{time.monotonic_ns()}"
    full = f"oci://{oci_registry}/{team}/contract:v2"
    r = run_cli("push", "contract:v1", full, "--json")
    assert r.code == 0 and r.json()["ref"] == "contract:v2", r
    r = run_cli("ls", "--registry", f"oci://{oci_registry}/{team}", "--json")
    assert r.json()["snapshots"] == [{"name": "contract", "tag": "v2", "digest": digest}], r
    r = run_cli("inspect", full, "--json")
    assert r.code == 0 and r.json()["digest"] == digest, r
    r = run_cli("inspect", f"oci://{oci_registry}/{team}/contract@{digest}", "--json")
    assert r.code == 0 and r.json()["digest"] == digest, r

    node = {"SNAPBUILD_HOME": str(tmp_path / "node-home")}
    r = run_cli("pull", full, "--json", env=node)
    assert r.code == 0 and r.json()["blobs_fetched"] > 0, r
    r = run_cli("inspect", "contract:v2", "--json", env=node)  # tagged in the node's own registry by its name
    assert r.code == 0 and r.json()["digest"] == digest, r
    out = tmp_path / "out"
    r = run_cli("pull", full, "--dest", out, tool="snapbuild-runner", env={"SNAPBUILD_HOME": str(tmp_path / "rh")})
    assert r.code == 0 and (out / "data" / "out.txt").read_text() == "print('v1')\n", r

    r = run_cli("keygen", tmp_path / "key")
    assert r.code == 0, r
    r = run_cli("sign", full, "--key", tmp_path / "key", "--json")
    assert r.code == 0 and r.json()["digest"] == digest, r

    bucket = f"refs-{time.monotonic_ns()}"
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    s3_env = {"SNAPBUILD_S3_ENDPOINT": s3_server}
    r = run_cli("push", "contract:v1", f"s3://{bucket}/snaps/contract:v3", env=s3_env)
    assert r.code == 0, r
    r = run_cli("inspect", f"s3://{bucket}/snaps/contract:v3", "--json", env=s3_env)
    assert r.code == 0 and r.json()["digest"] == digest, r
    files = tmp_path / "files-registry"
    r = run_cli("push", "contract:v1", f"file://{files}/contract:v4")
    assert r.code == 0, r
    r = run_cli("inspect", f"file://{files}/contract:v4", "--json")
    assert r.code == 0 and r.json()["digest"] == digest, r

    r = run_cli("rm", full)
    assert r.code == 0 and "removed contract:v2" in r.out, r
    r = run_cli("inspect", full)
    assert r.code == 6, r

    # the forms that are refused, each showing both
    r = run_cli("pull", "contract:v1", "--registry", f"oci://{oci_registry}/{team}/contract:v2")
    assert r.code == 2 and "where a registry was expected" in r.err and "in place of REF" in r.err, r
    assert "Traceback" not in r.err
    r = run_cli("pull", full, "--registry", f"oci://{oci_registry}/{team}")
    assert r.code == 2 and "leave out --registry" in r.err, r
    r = run_cli("push", "contract:v1", full, "--as", "contract:v9")
    assert r.code == 2 and "leave out --as" in r.err, r


def test_a_process_snapshot_restores_from_a_full_reference(oci_registry, recipe, store, tmp_path, run_cli):
    from test_criu_snapshots import counter_recipe
    from snapbuild.runner.restore import stop
    from testkit import post

    port = free_port()
    [res] = build(counter_recipe(recipe, port), store=store)
    assert res.ok
    full = f"oci://{oci_registry}/refs{time.monotonic_ns()}/counter:v1"
    assert run_cli("push", "counter:v1", full).code == 0
    node = {"SNAPBUILD_HOME": str(tmp_path / "node")}
    r = run_cli("restore", full, "--json", tool="snapbuild-runner", env=node)
    assert r.code == 0, r
    try:
        assert r.json()["mode"] == "restore", r
        assert post(port, "/count")["count"] == 3
        logs = run_cli("logs", full, tool="snapbuild-runner", env=node)
        assert logs.code == 0, logs
    finally:
        stop(r.json()["pid"])
