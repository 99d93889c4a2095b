"""build --cache-to / --cache-from through real registries (Debian's docker-registry and
moto's S3 server on 127.0.0.1): a fresh store gets a hit for every unchanged step and
downloads only what the steps it runs and the published snapshot need."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.build import plan as make_plans
from snapbuild.errors import NotFound
from snapbuild.registry import default_registry_url, open_registry, parse_ref
from snapbuild.registry.ref import Ref
from snapbuild.remote_cache import REPO
from snapbuild.signing import Policy, UntrustedSnapshot, keygen, verify
from snapbuild.store import Store
from snapbuild.store.chunks import read_file
from snapbuild.store.tree import load_tree

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
    keygen(tmp_path / "ci.key")
    a = Store(tmp_path / "machine-a")
    [first] = build(path, store=a, cache_to=[cache_url], sign_key=tmp_path / "ci.key")
    assert first.ok and {r.status for r in first.steps.values()} == {"built"}

    b = Store(tmp_path / "machine-b")
    trusted = {"cache_from": [cache_url], "cache_trust": [tmp_path / "ci.key.pub"]}
    [hit] = build(path, store=b, **trusted)
    assert hit.ok and {n: r.status for n, r in hit.steps.items()} == dict.fromkeys(first.steps, "cached")
    assert all(r.reason == f"in remote cache {cache_url}" for r in hit.steps.values())
    assert hit.snapshot == first.snapshot, "the same snapshot, without running anything"
    assert hit.warnings == [], "signed entries are taken silently"
    heavy = first.steps["heavy"].artifact
    assert not b.blobs.has(heavy), "heavy's output is needed by nothing that runs: not downloaded"
    assert b.get_ref(first.steps["final"].key) is not None, "the published step is in the store"

    [again] = build(path, store=b, **trusted)
    assert {r.status for r in again.steps.values()} == {"cached"} and again.snapshot == first.snapshot

    [unsigned] = build(path, store=Store(tmp_path / "machine-c"), cache_from=[cache_url])
    assert {r.status for r in unsigned.steps.values()} == {"cached"}
    assert unsigned.snapshot != first.snapshot, "taken without --cache-trust: the snapshot records it"
    assert [w.split(" came from")[0] for w in unsigned.warnings] == [f"step {n}" for n in first.steps]


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


def _forge_mid(url: str, path, tmp_path) -> str:
    """Someone who can write the cache, and nothing else, replaces mid's entry with an
    output of their own (made by hand: tests/integration/test_hostile.py's Forge)."""
    from test_hostile import Forge

    forge = Forge(tmp_path / "forge")
    [p] = make_plans(path, store=Store(tmp_path / "attacker"))
    key = p.steps["mid"].key
    entry = forge.cache_entry(key, forge.tree(forge.file("size.txt", b"pwned\n")))
    forge.publish(url, REPO, key, entry)
    return entry


def _out(home, artifact: str) -> bytes:
    blobs = Store(home).blobs
    [entry] = [e for e in load_tree(blobs, artifact)["entries"] if e["path"] == "out.txt"]
    return read_file(blobs, entry)


def _snapshot(run_cli, env) -> dict:
    r = run_cli("inspect", "cached:v1", "--json", env=env)
    assert r.code == 0, r
    return r.json()


def _signed_by(home, policy_key) -> bool:
    reg = open_registry(default_registry_url(home))
    ref = parse_ref("cached:v1")
    policy = Policy(rules=[("*", [policy_key])], default="reject", path=home / "policy")
    try:
        verify(reg, ref, reg.resolve(ref), policy)
    except UntrustedSnapshot:
        return False
    return True


@pytest.fixture
def poisoned(oci_registry, recipe, project, run_cli, tmp_path):
    """A cache the release build filled (entries signed with ci.key) in which an attacker
    then replaced mid's entry; app.py changed since, so that final runs and reads mid."""
    (project / "src").mkdir()
    (project / "src" / "app.py").write_text("print('v1')\n")
    path = recipe(RECIPE.replace('needs: [src], run: "head', 'run: "head'))  # heavy reads nothing
    url = f"oci://{oci_registry}/poison{time.monotonic_ns()}"
    assert run_cli("keygen", tmp_path / "ci.key").code == 0
    r = run_cli("build", path, "--cache-to", url, "--sign-key", tmp_path / "ci.key",
                env={"SNAPBUILD_HOME": str(tmp_path / "release")})
    assert r.code == 0, r
    forged = _forge_mid(url, path, tmp_path)
    (project / "src" / "app.py").write_text("print('v2')\n")
    return path, url, forged


def test_an_entry_taken_without_trust_is_named_recorded_and_sign_refuses_it(poisoned, run_cli, tmp_path):
    from snapbuild.signing import load_public_key

    path, url, forged = poisoned
    home = tmp_path / "ci-b"
    env = {"SNAPBUILD_HOME": str(home)}
    other = f"file://{tmp_path / 'other-cache'}"
    r = run_cli("build", path, "--cache-from", url, "--cache-to", other, "--sign-key", tmp_path / "ci.key",
                "--progress", "plain", "--json", env=env)
    assert r.code == 0, r
    res = r.json()
    assert {s["name"]: s["status"] for s in res["steps"]} == {"src": "built", "heavy": "cached", "mid": "cached",
                                                               "final": "built"}
    snap = _snapshot(run_cli, env)
    assert _out(home, snap["outputs"][0]["tree"]) == b"pwned\nprint('v2')\n", "the attack works: final read it"

    # The warning names the step, the cache and the entry; the snapshot records them.
    warn = f"warning: step mid came from the remote cache {url} without --cache-trust (entry {forged[:19]})"
    assert warn in r.err and any(w.startswith(warn.removeprefix("warning: ")) for w in res["warnings"]), r.err
    assert "warning: step final was built from mid" in r.err
    recorded = {s["name"]: s.get("unverified_cache") for s in snap["steps"]}
    assert recorded["mid"] == {"registry": url, "entry": forged}
    assert recorded["heavy"]["registry"] == url, "a genuine entry, but nothing checked that"
    assert recorded["final"] == {"built_from": ["mid"]} and recorded["src"] is None
    assert "remote cache: mid not sent to" in r.err, "what nobody verified is not signed into another cache"
    keys = {s["name"]: s["key"] for s in res["steps"]}
    open_registry(other).resolve(Ref(name=REPO, tag=keys["src"]))
    for name in ("mid", "final"):
        with pytest.raises(NotFound):
            open_registry(other).resolve(Ref(name=REPO, tag=keys[name]))

    # `snapbuild sign` refuses it, naming the steps; nodes would not trust it.
    key = load_public_key(tmp_path / "ci.key.pub")
    r = run_cli("sign", "cached:v1", "--key", tmp_path / "ci.key", env=env)
    assert r.code == 10, r
    assert "not signing cached:v1" in r.err and f"mid (from {url})" in r.err and "final (built from mid)" in r.err
    assert "TIP" in r.err and "--cache-trust" in r.err and "--allow-untrusted-cache" in r.err
    assert "Traceback" not in r.err
    assert not _signed_by(home, key)

    # The local store does not launder it: a build without --cache-from still records it.
    r = run_cli("build", path, "--progress", "plain", env=env)
    assert r.code == 0 and "warning: step mid came from the remote cache" in r.err, r
    assert run_cli("sign", "cached:v1", "--key", tmp_path / "ci.key", env=env).code == 10

    # The override signs, and says so.
    r = run_cli("sign", "cached:v1", "--key", tmp_path / "ci.key", "--allow-untrusted-cache", env=env)
    assert r.code == 0, r
    assert "warning: signed anyway (--allow-untrusted-cache): steps mid, final came from" in r.err, r.err
    assert _signed_by(home, key)


def test_with_cache_trust_the_replaced_entry_is_passed_over_and_signed_ones_taken(poisoned, run_cli, tmp_path):
    path, url, forged = poisoned
    home = tmp_path / "ci-c"
    env = {"SNAPBUILD_HOME": str(home)}
    r = run_cli("build", path, "--cache-from", url, "--cache-trust", tmp_path / "ci.key.pub", "--progress", "plain",
                "--json", env=env)
    assert r.code == 0, r
    status = {s["name"]: s["status"] for s in r.json()["steps"]}
    assert status == {"src": "built", "heavy": "cached", "mid": "built", "final": "built"}, status
    assert f"mid: remote cache {url}: not using the entry for" in r.err and "is not signed" in r.err, r.err
    assert "warning:" not in r.err and "warnings" not in r.json(), "signed entries are taken silently"
    snap = _snapshot(run_cli, env)
    assert not any("unverified_cache" in s for s in snap["steps"])
    assert _out(home, snap["outputs"][0]["tree"]) == b"9000000\nprint('v2')\n"
    r = run_cli("sign", "cached:v1", "--key", tmp_path / "ci.key", env=env)
    assert r.code == 0 and "warning" not in r.err, r


def test_the_issue_s_attack_a_replaced_input_runs_in_the_warm_up_and_sign_refuses(oci_registry, recipe, project,
                                                                                run_cli, tmp_path):
    """The report: a step's entry replaced in the cache, whose sitecustomize.py the
    warm-up then ran (as root), and `snapbuild sign` signed the checkpoint. Real CRIU."""
    import shutil
    import sys

    from test_hostile import Forge
    from testkit import free_port

    port = free_port()
    ran = tmp_path / "attacker-code-ran"
    path = recipe(f"""
        name: warm
        steps:
          app: {{kind: files, root: app}}
          site: {{kind: command, run: "echo 'pass' > sitecustomize.py", outputs: [sitecustomize.py]}}
          server:
            kind: warmup
            needs: [app, site]
            run: "PYTHONPATH=$SNAPBUILD_INPUTS/site {sys.executable} $SNAPBUILD_INPUTS/app/counter_server.py --port {port}"
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
          snap: {{kind: checkpoint, process: server}}
        publish: {{tag: "warm:v1"}}
    """)
    (project / "app").mkdir()
    shutil.copy(Path(__file__).parent / "data" / "counter_server.py", project / "app" / "counter_server.py")
    url = f"oci://{oci_registry}/warm{time.monotonic_ns()}"
    assert run_cli("keygen", tmp_path / "ci.key").code == 0
    r = run_cli("build", path, "--cache-to", url, "--sign-key", tmp_path / "ci.key", timeout=300,
                env={"SNAPBUILD_HOME": str(tmp_path / "release")})
    assert r.code == 0, r
    forge = Forge(tmp_path / "forge")
    [p] = make_plans(path, store=Store(tmp_path / "attacker"))
    evil = forge.file("sitecustomize.py", f"open({str(ran)!r}, 'w').write('pwned')\n".encode())
    forged = forge.cache_entry(p.steps["site"].key, forge.tree(evil))
    forge.publish(url, REPO, p.steps["site"].key, forged)
    with open(project / "app" / "counter_server.py", "a") as f:
        f.write("# v2: the checkpoint is built again\n")

    env = {"SNAPBUILD_HOME": str(tmp_path / "ci")}
    r = run_cli("build", path, "--cache-from", url, "--progress", "plain", timeout=300, env=env)
    assert r.code == 0, r
    assert ran.read_text() == "pwned", "the attack is real: the warm-up ran the replaced entry's code"
    assert f"warning: step site came from the remote cache {url} without --cache-trust (entry {forged[:19]})" in r.err
    assert "warning: step snap was built from server, site" in r.err, r.err
    r = run_cli("sign", "warm:v1", "--key", tmp_path / "ci.key", env=env)
    assert r.code == 10 and f"site (from {url})" in r.err and "snap (built from server, site)" in r.err, r

    ran.unlink()
    env = {"SNAPBUILD_HOME": str(tmp_path / "ci-trusted")}
    r = run_cli("build", path, "--cache-from", url, "--cache-trust", tmp_path / "ci.key.pub", "--progress", "plain",
                timeout=300, env=env)
    assert r.code == 0, r
    assert not ran.exists(), "the replaced entry was passed over"
    assert "warning:" not in r.err
    assert run_cli("sign", "warm:v1", "--key", tmp_path / "ci.key", env=env).code == 0
