"""The CI files: registry/config.yml runs a real registry, and ci/publish-snapshot.sh
(what ci/github-actions/snapshot.yml runs) builds with the shared cache, pushes and
signs there; a node then accepts the snapshot under a trust policy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from testkit import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def team_registry(tmp_path):
    """docker-registry started from registry/config.yml, on a free loopback port."""
    import bcrypt

    password = "ci-secret-password"
    (tmp_path / "htpasswd").write_text(f"ci-user:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode()}\n")
    port = free_port()
    env = {**os.environ, "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(tmp_path / "data"),
           "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}", "REGISTRY_AUTH_HTPASSWD_PATH": str(tmp_path / "htpasswd")}
    proc = subprocess.Popen([shutil.which("docker-registry"), "serve", str(REPO / "registry" / "config.yml")],
                            env=env, stdout=open(tmp_path / "registry.log", "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
        except urllib.error.HTTPError as e:
            assert e.code == 401, "the config asks for logins"
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "registry.log").read_text()
            time.sleep(0.1)
    yield f"oci://127.0.0.1:{port}/team", "ci-user", password
    proc.terminate()
    proc.wait(timeout=10)


def _forge_entry(url: str, recipe_path: Path, step: str, tmp_path: Path) -> str:
    """What a job that can write the cache but lacks the signing key (a pull request's CI)
    can do: replace a step's entry with an output of its own."""
    from test_hostile import Forge

    from snapbuild.build import plan
    from snapbuild.remote_cache import REPO as CACHE_REPO
    from snapbuild.store import Store

    forge = Forge(tmp_path / "forge")
    [p] = plan(recipe_path, store=Store(tmp_path / "attacker"))
    key = p.steps[step].key
    entry = forge.cache_entry(key, forge.tree(forge.file("b.txt", b"pwned\n")))
    forge.publish(url, CACHE_REPO, key, entry)
    return entry


def test_publish_script_builds_with_the_cache_pushes_and_signs(team_registry, project, tmp_path, run_cli,
                                                               monkeypatch):
    url, user, password = team_registry
    (project / "recipe.yaml").write_text(
        'name: demo\nsteps:\n  a: {kind: command, run: "echo one > a.txt", outputs: [a.txt]}\n'
        '  b: {kind: command, needs: [a], run: "cat $SNAPBUILD_INPUTS/a/a.txt > b.txt", outputs: [b.txt]}\n'
        'publish: {tag: "demo:v1"}\n')
    assert run_cli("keygen", tmp_path / "ci.key").code == 0
    env = {**os.environ, "SNAPBUILD": str(BIN / "snapbuild"), "SNAPBUILD_PUBLISH_TO": url,
           "SNAPBUILD_SIGNING_KEY": (tmp_path / "ci.key").read_text(), "SNAPBUILD_REGISTRY_USERNAME": user,
           "SNAPBUILD_REGISTRY_PASSWORD": password, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for i, home in enumerate(("ci-1", "ci-2")):  # two fresh CI machines
        env["SNAPBUILD_HOME"] = str(tmp_path / home)
        r = subprocess.run([str(REPO / "ci" / "publish-snapshot.sh"), str(project / "recipe.yaml")], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        steps = {s["name"]: s for s in json.loads(r.stdout)["steps"]}
        if i == 0:
            assert [s["status"] for s in steps.values()] == ["built", "built"]
            monkeypatch.setenv("SNAPBUILD_REGISTRY_USERNAME", user)
            monkeypatch.setenv("SNAPBUILD_REGISTRY_PASSWORD", password)
            _forge_entry(url, project / "recipe.yaml", "b", tmp_path)
        else:
            assert [s["status"] for s in steps.values()] == ["cached", "built"], steps
            assert steps["a"]["reason"].startswith("in remote cache oci://"), "the shared cache, not a local one"
            assert "b: remote cache oci://" in r.stderr and "is not signed" in r.stderr, "the forged entry: unused"
            assert "warning: step" not in r.stderr, "a signed entry is taken silently"
    assert not list(tmp_path.glob("tmp*")), "the key's temporary file is gone"
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"snapshots": {"demo": [str(tmp_path / "ci.key.pub")]}}))
    r = run_cli("pull", "demo:v1", "--registry", url, "--trust-policy", policy, "--json", tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_REGISTRY_USERNAME": user,
                     "SNAPBUILD_REGISTRY_PASSWORD": password})
    assert r.code == 0 and r.json()["trust"]["trusted"] is True, r


def test_the_workflow_runs_the_publish_script_with_the_secrets_it_documents():
    wf = yaml.safe_load((REPO / "ci" / "github-actions" / "snapshot.yml").read_text())
    steps = wf["jobs"]["build"]["steps"]
    runs = " ".join(s.get("run", "") for s in steps)
    assert "ci/setup.sh" in runs and "ci/publish-snapshot.sh" in runs
    env = wf["jobs"]["build"]["env"]
    for var in ("SNAPBUILD_PUBLISH_TO", "SNAPBUILD_SIGNING_KEY", "SNAPBUILD_REGISTRY_USERNAME",
                "SNAPBUILD_REGISTRY_PASSWORD"):
        assert var in env, var
    script = (REPO / "ci" / "publish-snapshot.sh").read_text()
    for var in ("SNAPBUILD_PUBLISH_TO", "SNAPBUILD_CACHE", "SNAPBUILD_SIGNING_KEY"):
        assert var in script
    assert "--cache-from" not in runs and "--allow-untrusted-cache" not in runs + script


def test_the_publish_script_trusts_only_cache_entries_its_key_signed():
    """Every build the script runs that reads the cache takes only signed entries, and
    signs what it sends: a job that can write the cache cannot launder code through it."""
    script = (REPO / "ci" / "publish-snapshot.sh").read_text()
    builds = [" ".join(c.split()) for c in script.replace("\\\n", " ").splitlines() if '"$sb" build' in c]
    assert builds, "the script builds"
    for cmd in builds:
        assert "--cache-from" in cmd and "--cache-trust" in cmd and "--cache-to" in cmd and "--sign-key" in cmd, cmd
