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


def test_publish_script_builds_with_the_cache_pushes_and_signs(team_registry, project, tmp_path, run_cli):
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
        else:
            assert [s["status"] for s in steps.values()] == ["cached", "cached"], steps
            assert steps["b"]["reason"].startswith("in remote cache oci://"), "the shared cache, not a local one"
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
