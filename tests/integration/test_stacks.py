"""Real server stacks from PyPI, each built from its example recipe, restored on a clean
node (a new store, none of the build's /dev/shm files left) and asked the same questions
as its cold boot: FastAPI under `uvicorn --workers 2`, gunicorn --preload with sync and
gthread workers, and a two-process engine over pyzmq ipc sockets with a shared-memory
ring (vLLM V1's shape). The stack's packages are installed by the recipe's own pip step
(cached on disk by its key between runs, like every step).
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import process
from snapbuild.store import Store

from testkit import free_port, port_free  # tests/integration/testkit.py

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "recipes" / "examples"
STACKS = {  # test id: (recipe, --set values, tag, processes in the tree at least)
    "uvicorn-workers": ("uvicorn-workers.yaml", {}, "uvicorn-workers:dev", 3),
    "gunicorn-sync": ("gunicorn-preload.yaml", {"worker_class": "sync"}, "gunicorn-preload-sync:dev", 3),
    "gunicorn-gthread": ("gunicorn-preload.yaml", {"worker_class": "gthread"}, "gunicorn-preload-gthread:dev", 3),
    "zmq-engine": ("zmq-engine.yaml", {}, "zmq-engine:dev", 2),
    "hypercorn-workers": ("hypercorn-workers.yaml", {}, "hypercorn-workers:dev", 3),
    "aiohttp-gunicorn": ("aiohttp-gunicorn.yaml", {}, "aiohttp-gunicorn:dev", 3),
    "torch-mp-workers": ("torch-mp-workers.yaml", {}, "torch-mp-workers:dev", 3),
}


def ask(port: int, text: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/infer", data=json.dumps({"text": text}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


QUESTIONS = ["hello", "a restored server", "answers as a cold one", "hello"]


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_a_real_stack_restores_on_a_clean_node_and_answers_as_its_cold_boot(stack, project, store, tmp_path):
    recipe, sets, tag, processes = STACKS[stack]
    shutil.copy(EXAMPLES / recipe, project)
    shutil.copytree(EXAMPLES / "stacks", project / "stacks", dirs_exist_ok=True)
    port = free_port()
    [res] = build(project / recipe, store=store, sets={**sets, "port": str(port)})
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    assert port_free(port), "the warm-up tree is gone after the checkpoint"

    ipc = Path(f"/tmp/snapbuild-zmq-{port}")  # the zmq engine's socket folder (zmq-engine.yaml)
    shutil.rmtree(ipc, ignore_errors=True)  # a clean node has none

    node = Store(tmp_path / "node")
    reg = f"file://{store.home / 'registry'}"
    out = run(tag, registry=reg, store=node, fallback="fail")
    try:
        assert out["mode"] == "restore" and out["verify"] == "same", out
        assert ipc.is_dir() == (stack == "zmq-engine"), "the restore made the socket folder it needs"
        assert len(process.tree(out["pid"])) >= processes, "every process of the tree came back"
        warm = [ask(port, q) for q in QUESTIONS]
    finally:
        stop(out["pid"])
        process.wait_gone(process.tree(out["pid"]), timeout=10)
    cold = run(tag, registry=reg, store=node, mode="cold")
    try:
        assert [ask(port, q) for q in QUESTIONS] == warm, "restored and cold servers answer alike, bit for bit"
    finally:
        stop(cold["pid"])
        shutil.rmtree(ipc, ignore_errors=True)


def test_gunicorn_workers_in_a_runc_container_restore_on_a_clean_node(base_rootfs, dockerd, project, store,
                                                                      tmp_path):
    """The same gunicorn stack on the other engine: gunicorn (pure Python, installed on
    this machine by the recipe's pip step) mounted into a Debian container, whose own
    /dev/shm and worker heartbeat files travel in runc's checkpoint."""
    shutil.copytree(EXAMPLES / "stacks", project / "stacks", dirs_exist_ok=True)
    port = free_port()
    (project / "recipe.yaml").write_text(f"""
name: gunicorn-runc
steps:
  pydeps:
    kind: command
    run: "python3 -m pip install --quiet --no-compile --target site gunicorn==27.0.1"
    pass_env: ["PIP_*"]
    outputs: [site/]
  base: {{kind: image, from: "rootfs:{base_rootfs}"}}
  app: {{kind: image, from: base, copy: {{"stacks/": /app/}}}}
  server:
    kind: warmup
    image: app
    mounts: {{/deps: pydeps}}
    command: [python3, -m, gunicorn, --preload, --workers, "2", --worker-class, gthread, --threads, "2",
              --bind, "127.0.0.1:{port}", --chdir, /app, "wsgi_app:app"]
    env: {{PYTHONPATH: /deps/site, PYTHONDONTWRITEBYTECODE: "1"}}
    ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 120}}
    exercise: [{{http: "POST /infer", body: '{{"text": "hello"}}', repeat: 4}}]
  snap:
    kind: checkpoint
    process: server
    engine: runc
    verify: [{{http: "POST /infer", body: '{{"text": "check"}}'}}]
publish: {{tag: "gunicorn-runc:v1"}}
""")
    [res] = build(project / "recipe.yaml", store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    node, reg = Store(tmp_path / "node"), f"file://{store.home / 'registry'}"
    out = run("gunicorn-runc:v1", registry=reg, store=node, fallback="fail", publish="0")
    try:
        assert out["mode"] == "restore" and out["verify"] == "same", out
        assert len(process.tree(out["pid"])) >= 3, "the arbiter and both workers came back"
        warm = [ask(int(out["address"].rsplit(":", 1)[1]), q) for q in QUESTIONS]
    finally:
        stop(out["container"])
    cold = run("gunicorn-runc:v1", registry=reg, store=node, mode="cold", publish="0")
    try:
        assert [ask(int(cold["address"].rsplit(":", 1)[1]), q) for q in QUESTIONS] == warm
    finally:
        stop(cold["container"])
