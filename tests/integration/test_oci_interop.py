"""Real OCI clients read and copy snapshots: skopeo on the file:// registry and on a real
OCI registry (copying between registries), and the oras client on an OCI registry."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from snapbuild.build import build
from snapbuild.runner.pull import pull
from snapbuild.store import Store

pytestmark = pytest.mark.integration

RECIPE = """
name: demo
steps:
  a: {kind: command, run: "seq 200000 > n.txt; head -c 5000000 /dev/zero > z", outputs: ["*"]}
publish: {tag: "demo:v1"}
"""


@pytest.fixture
def skopeo():
    path = shutil.which("skopeo")
    assert path, "skopeo is installed by ci/setup.sh; run it first"
    return path


def test_skopeo_inspects_and_copies_a_snapshot(skopeo, recipe, store, tmp_path):
    [res] = build(recipe(RECIPE), store=store)
    layout = store.home / "registry" / "demo"
    raw = subprocess.run([skopeo, "inspect", "--raw", f"oci:{layout}:v1"], capture_output=True, check=True).stdout
    manifest = json.loads(raw)
    assert manifest["artifactType"] == "application/vnd.snapbuild.snapshot.v1"

    # Copy with the standard tool into another registry root; the digest is unchanged
    # and the runner restores from the copy.
    (tmp_path / "mirror").mkdir()
    subprocess.run([skopeo, "copy", "--quiet", f"oci:{layout}:v1", f"oci:{tmp_path / 'mirror' / 'demo'}:v1"],
                   check=True)
    out = pull("demo:v1", registry=f"file://{tmp_path / 'mirror'}", dest=tmp_path / "out",
               store=Store(tmp_path / "node"))
    assert out["digest"] == res.snapshot
    assert (tmp_path / "out" / "a" / "n.txt").read_text().split()[-1] == "200000"
    assert (tmp_path / "out" / "a" / "z").stat().st_size == 5_000_000


def _push_to(url: str, store: Store, res) -> None:
    from snapbuild.registry import open_registry, parse_ref
    from snapbuild.registry.transfer import push
    from snapbuild.store.snapshot import parse_manifest, referenced_blobs

    manifest = parse_manifest(store.blobs.get(res.snapshot), res.snapshot)
    push(open_registry(url), parse_ref("demo:v1"), res.snapshot, referenced_blobs(manifest), store.blobs)


def test_skopeo_copies_a_snapshot_between_registries_and_it_still_restores(skopeo, oci_registry, recipe, store,
                                                                          tmp_path):
    [res] = build(recipe(RECIPE), store=store)
    _push_to(f"oci://{oci_registry}/src", store, res)
    raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{oci_registry}/src/demo:v1"],
                         capture_output=True, check=True).stdout
    manifest = json.loads(raw)
    assert manifest["artifactType"] == "application/vnd.snapbuild.snapshot.v1"
    assert manifest["config"]["mediaType"] == "application/vnd.snapbuild.snapshot.config.v1+json"
    subprocess.run([skopeo, "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"docker://{oci_registry}/src/demo:v1", f"docker://{oci_registry}/mirror/demo:v1"], check=True)
    out = pull("demo:v1", registry=f"oci://{oci_registry}/mirror", dest=tmp_path / "out",
               store=Store(tmp_path / "node"))
    assert out["digest"] == res.snapshot, "the copy keeps the manifest digest"
    assert (tmp_path / "out" / "a" / "z").stat().st_size == 5_000_000


def test_oras_reads_what_snapbuild_pushed(oci_registry, recipe, store, tmp_path):
    import oras.client

    [res] = build(recipe(RECIPE), store=store)
    _push_to(f"oci://{oci_registry}/oras", store, res)
    client = oras.client.OrasClient(hostname=oci_registry, insecure=True)
    manifest = client.get_manifest(f"{oci_registry}/oras/demo:v1")
    assert manifest["artifactType"] == "application/vnd.snapbuild.snapshot.v1"
    assert client.get_tags(f"{oci_registry}/oras/demo") == ["v1"]
    layer = manifest["layers"][0]  # the published step's tree
    blob = client.get_blob(f"{oci_registry}/oras/demo", layer["digest"])
    assert json.loads(blob.content)["entries"], "a tree that lists the step's files"
