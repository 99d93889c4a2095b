"""build --cache-to / --cache-from through real registries (Debian's docker-registry and
moto's S3 server on 127.0.0.1): a fresh store gets a hit for every unchanged step and
downloads only what the steps it runs and the published snapshot need."""

from __future__ import annotations

import time

import pytest

from snapbuild.build import build
from snapbuild.store import Store

pytestmark = pytest.mark.integration

RECIPE = """
name: cached
steps:
  src: {kind: files, root: src}
  heavy: {kind: command, needs: [src], run: "head -c 9000000 /dev/urandom > big.bin", outputs: [big.bin]}
  mid: {kind: command, needs: [heavy], run: "wc -c < $SNAPBUILD_INPUTS/heavy/big.bin > size.txt", outputs: [size.txt]}
  final:
    kind: command
    needs: [mid, src]
    run: "cat $SNAPBUILD_INPUTS/mid/size.txt $SNAPBUILD_INPUTS/src/app.py > out.txt"
    outputs: [out.txt]
publish: {tag: "cached:v1", steps: [final]}
"""


@pytest.fixture(params=["oci", "s3"])
def cache_url(request, monkeypatch):
    if request.param == "oci":
        return f"oci://{request.getfixturevalue('oci_registry')}/ci{time.monotonic_ns()}"
    _, bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/ci"


def test_a_fresh_store_gets_every_unchanged_step_from_the_remote_cache(cache_url, recipe, project, tmp_path):
    (project / "src").mkdir()
    (project / "src" / "app.py").write_text("print('v1')\n")
    path = recipe(RECIPE)
    a = Store(tmp_path / "machine-a")
    [first] = build(path, store=a, cache_to=[cache_url])
    assert first.ok and {r.status for r in first.steps.values()} == {"built"}

    b = Store(tmp_path / "machine-b")
    [hit] = build(path, store=b, cache_from=[cache_url])
    assert hit.ok and {n: r.status for n, r in hit.steps.items()} == dict.fromkeys(first.steps, "cached")
    assert all(r.reason == f"in remote cache {cache_url}" for r in hit.steps.values())
    assert hit.snapshot == first.snapshot, "the same snapshot, without running anything"
    heavy = first.steps["heavy"].artifact
    assert not b.blobs.has(heavy), "heavy's output is needed by nothing that runs: not downloaded"
    assert b.get_ref(first.steps["final"].key) is not None, "the published step is in the store"

    [again] = build(path, store=b, cache_from=[cache_url])
    assert {r.status for r in again.steps.values()} == {"cached"} and again.snapshot == first.snapshot


def test_steps_whose_inputs_did_not_change_come_from_the_cache_and_only_needed_outputs_are_fetched(
        cache_url, recipe, project, tmp_path):
    (project / "src").mkdir()
    (project / "src" / "app.py").write_text("print('v1')\n")
    path = recipe(RECIPE.replace("needs: [src], run: \"head", "run: \"head"))  # heavy reads nothing
    a = Store(tmp_path / "machine-a")
    [first] = build(path, store=a, cache_to=[cache_url])
    assert first.ok
    (project / "src" / "app.py").write_text("print('v2')\n")
    b = Store(tmp_path / "machine-b")
    [second] = build(path, store=b, cache_from=[cache_url])
    status = {n: r.status for n, r in second.steps.items()}
    assert status == {"src": "built", "heavy": "cached", "mid": "cached", "final": "built"}, status
    assert b.blobs.has(first.steps["mid"].artifact), "final runs and reads mid: downloaded"
    assert not b.blobs.has(first.steps["heavy"].artifact), "nothing that runs reads heavy: not downloaded"
    assert (b.blobs.size(first.steps["mid"].artifact)) < 10_000


def test_an_unreachable_cache_is_a_miss_not_a_failure(recipe, project, tmp_path):
    from testkit import free_port

    (project / "src").mkdir()
    (project / "src" / "app.py").write_text("x\n")
    [res] = build(recipe(RECIPE), store=Store(tmp_path / "s"), cache_from=[f"oci://127.0.0.1:{free_port()}/none"])
    assert res.ok and {r.status for r in res.steps.values()} == {"built"}


def test_the_build_command_takes_cache_options(oci_registry, recipe, project, run_cli, tmp_path):
    (project / "src").mkdir()
    (project / "src" / "app.py").write_text("x\n")
    path = recipe(RECIPE)
    url = f"oci://{oci_registry}/cli{time.monotonic_ns()}"
    r = run_cli("build", path, "--cache-to", url, "--progress", "plain", "--json")
    assert r.code == 0 and "remote cache: 4 step result(s) sent to" in r.err, r
    r = run_cli("build", path, "--cache-from", url, "--progress", "plain", "--json",
                env={"SNAPBUILD_HOME": str(tmp_path / "fresh")})
    assert r.code == 0, r
    assert [s["status"] for s in r.json()["steps"]] == ["cached"] * 4
    assert "remote cache: heavy found in" in r.err and "not needed here, not downloaded" in r.err
