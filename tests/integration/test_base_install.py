"""The base package alone runs a node: a fresh venv gets only `pip install snapbuild`
(no build extras: no click, pydantic, docker, boto3, huggingface_hub), and its
`snapbuild-runner` pulls and restores a host-process snapshot (real CRIU) that the
full install built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapbuild.build import build

from testkit import free_port, post, weights_counter_recipe

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUILD_ONLY = ("click", "pydantic", "jinja2", "yaml", "docker", "boto3", "huggingface_hub", "networkx", "rich")


@pytest.fixture(scope="session")
def base_venv(tmp_path_factory) -> Path:
    """A venv with the wheel of this checkout and its base dependencies only."""
    tmp = tmp_path_factory.mktemp("base-install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp / "wheels"),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    [wheel] = (tmp / "wheels").glob("snapbuild-*.whl")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    return venv


def test_the_base_package_has_no_build_dependencies(base_venv):
    py = str(base_venv / "bin" / "python")
    probe = "import importlib.util, json, sys; print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))"
    found = json.loads(subprocess.run([py, "-c", probe, *BUILD_ONLY], capture_output=True, text=True,
                                      check=True).stdout)
    assert found == [], f"the base install pulled in build-side packages: {found}"
    r = subprocess.run([py, "-c", "import snapbuild.runner.agent, snapbuild.runner.restore"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_a_base_install_restores_what_the_full_install_built(base_venv, recipe, store, tmp_path):
    port = free_port()
    path, weights = weights_counter_recipe(recipe, port, name="basecounter", data="data")
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    runner = str(base_venv / "bin" / "snapbuild-runner")
    env = {"PATH": f"{base_venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_RUN_ROOT": os.environ["SNAPBUILD_RUN_ROOT"],
           "SNAPBUILD_IMAGE_CACHE": str(tmp_path / "node-images")}
    reg = f"file://{store.home / 'registry'}"
    r = subprocess.run([runner, "restore", "basecounter:v1", "--registry", reg, "--json"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    try:
        assert out["mode"] == "restore", out
        assert "WARNING snapshots are not verified" in r.stderr
        assert post(port, "/count")["count"] == 3, "the warm state came back"
    finally:
        stop = subprocess.run([runner, "stop", str(out["pid"])], capture_output=True, text=True, env=env, timeout=60)
        assert stop.returncode == 0, stop.stderr
