"""A real OCI client (skopeo) reads and copies snapshots from the file:// registry."""

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
