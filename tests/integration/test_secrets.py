"""Secrets stay out of snapshots: the HF_TOKEN a weights step downloads with and the
AWS keys of an S3 source appear in no blob of the snapshot, decompressed (a real
CRIU checkpoint of a warm server that read both weights; the Hugging Face Hub is the
local stand-in server driven by the real huggingface_hub client, S3 is moto's server).
A warm-up env whose names look like secrets is warned about at build and by inspect."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapbuild.store import Store
from snapbuild.store.chunks import read_file
from snapbuild.store.tree import load_tree

from fakehub import FakeHub  # tests/integration/fakehub.py
from testkit import COUNTER, free_port, port_free

pytestmark = pytest.mark.integration

HF_TOKEN = "hf_snapbuildTestTokenValue7731"
AWS_KEY_ID = "AKIASNAPBUILDTEST7731"
AWS_SECRET = "snapbuild/aws+secret+value+7731"


def every_byte_of(store: Store, manifest_digest: str) -> list[tuple[str, bytes]]:
    """(what, bytes) for the manifest, the config, every tree blob, and the decompressed
    content of every file of every tree (CRIU's page images among them)."""
    manifest = json.loads(store.blobs.get(manifest_digest))
    out = [("manifest", store.blobs.get(manifest_digest)),
           ("config", store.blobs.get(manifest["config"]["digest"]))]
    for layer in manifest["layers"]:
        if layer["mediaType"].startswith("application/vnd.snapbuild.tree"):
            out.append((f"tree {layer['digest']}", store.blobs.get(layer["digest"])))
            for e in load_tree(store.blobs, layer["digest"])["entries"]:
                if e["type"] == "file":
                    out.append((f"{layer['digest'][:19]}:{e['path']}", read_file(store.blobs, e)))
    return out


def test_tokens_and_keys_used_to_download_weights_are_nowhere_in_the_snapshot(
        s3_server, recipe, project, run_cli, monkeypatch, home):
    import boto3

    hub = FakeHub()
    try:
        hub.publish("acme/tiny", {"model.safetensors": b"\x01" * 5000, "config.json": b"{}"})
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": HF_TOKEN,
               "AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=s3_server)
        bucket = f"secrets-{os.getpid()}-{time.monotonic_ns()}"
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="m/w.bin", Body=os.urandom(100_000))
        port = free_port()
        path = recipe(f"""
            name: secretive
            steps:
              app: {{kind: files, root: app}}
              hfw: {{kind: weights, source: "hf://acme/tiny@main"}}
              s3w: {{kind: weights, source: "s3://{bucket}/m/", endpoint_url: "{s3_server}"}}
              server:
                kind: warmup
                needs: [app, hfw, s3w]
                env: {{SERVICE_API_TOKEN: "named-like-a-secret"}}
                run: "{sys.executable} $SNAPBUILD_INPUTS/app/counter_server.py --port {port} --weights $SNAPBUILD_INPUTS/s3w/w.bin"
                ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 30}}
                exercise: [{{http: "POST /count", repeat: 2}}]
              snap: {{kind: checkpoint, process: server}}
            publish: {{tag: "secretive:v1"}}
        """)
        (project / "app").mkdir()
        shutil.copy(COUNTER, project / "app" / "counter_server.py")
        r = run_cli("build", path, "--json", "--progress", "plain", timeout=300)
        assert r.code == 0, (r.out, r.err)
        assert "Authorization: (given)" in hub.requests, "the token was used for the download"
    finally:
        hub.close()
    out = r.json()
    warning = "step server: env or command SERVICE_API_TOKEN look like secrets"
    assert any(w.startswith(warning) for w in out["warnings"]) and warning in r.err

    store = Store(home)
    blobs = every_byte_of(store, out["snapshot"])
    assert any("pages-" in what for what, _ in blobs), "the checkpoint's memory pages were scanned"
    for secret in (HF_TOKEN, AWS_KEY_ID, AWS_SECRET):
        found = [what for what, data in blobs if secret.encode() in data]
        assert found == [], f"{secret} is in {found}"

    r = run_cli("inspect", "secretive:v1")
    assert r.code == 0 and "SERVICE_API_TOKEN, which look like secrets" in r.out, r.out
    assert run_cli("inspect", "secretive:v1", "--json").json()["secret_env"] == ["SERVICE_API_TOKEN"]


ENV_SERVER = '''
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

AT_START = os.environ.get("DATABASE_URL")  # what the warm-up read: its memory keeps it


class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"database_url": AT_START}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), H).serve_forever()
'''
BUILD_DB = "postgres://app:build-side-pw-5520@db.build/app"
NODE_DB = "postgres://app:node-side-pw-9931@db.node/app"
GH_TOKEN = "ghp_" + "Zq7" * 12


def test_env_from_node_is_never_written_into_the_snapshot(recipe, project, run_cli, home, monkeypatch):
    """`env_from_node: [DATABASE_URL]`: the warm-up takes the build's value, a cold boot
    the node's, a restored server keeps the warm-up's (its memory is the checkpoint's)
    while its after_restore run lines see the node's; no JSON of the snapshot holds
    either value (the memory pages do hold the build's: the server read it)."""
    import urllib.request

    from snapbuild.runner.restore import run, stop

    port = free_port()
    (project / "app").mkdir()
    (project / "app" / "env_server.py").write_text(ENV_SERVER)
    path = recipe(f"""
        name: fromnode
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            env_from_node: [DATABASE_URL]
            env: {{TOKENIZERS_PARALLELISM: "false"}}
            command: ["{sys.executable}", $SNAPBUILD_INPUTS/app/env_server.py, --port, "{port}", --gh, "{GH_TOKEN}"]
            ready: {{http: "http://127.0.0.1:{port}/", timeout: 30}}
          snap:
            kind: checkpoint
            process: server
            after_restore: [{{run: 'echo "$DATABASE_URL" > $SNAPBUILD_RUN/seen-after-restore'}}]
        publish: {{tag: "fromnode:v1"}}
    """)
    r = run_cli("build", path, "--json", "--progress", "plain", env={"DATABASE_URL": BUILD_DB}, timeout=300)
    assert r.code == 0, (r.out, r.err)
    out = r.json()
    # named by where it is (argument 5 of the command), never by its value; not TOKENIZERS_*
    warning = "step server: env or command command[5] (a GitHub token) look like secrets"
    mine = [w for w in out["warnings"] if w.startswith("step server:")]
    assert len(mine) == 1 and mine[0].startswith(warning), out["warnings"]
    assert GH_TOKEN not in r.err and BUILD_DB not in r.out + r.err

    store = Store(home)
    blobs = every_byte_of(store, out["snapshot"])
    config = next(data for what, data in blobs if what == "config")
    assert b'"env_from_node":["DATABASE_URL"]' in config.replace(b" ", b"")
    found = [what for what, data in blobs if BUILD_DB.encode() in data]
    assert found and all(":images/pages-" in what for what in found), \
        f"only the warm server's memory holds the build's value, not {found}"
    assert run_cli("inspect", "fromnode:v1", "--json").json()["env_from_node"] == ["DATABASE_URL"]

    def asked() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as a:
            return json.loads(a.read())["database_url"]

    monkeypatch.setenv("DATABASE_URL", NODE_DB)
    warm = run("fromnode:v1", store=store, fallback="fail")
    try:
        assert asked() == BUILD_DB, "a restored process keeps the environment it was checkpointed with"
        run_dir = Path(warm["log"]).parent
        assert (run_dir / "seen-after-restore").read_text().strip() == NODE_DB, "after_restore sees the node's"
    finally:
        stop(warm["pid"])
    cold = run("fromnode:v1", store=store, mode="cold")
    try:
        assert asked() == NODE_DB, "a cold boot takes the node's value"
    finally:
        stop(cold["pid"])

    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # a node without it
    proc = subprocess.run([str(Path(sys.executable).parent / "snapbuild-runner"), "restore", "fromnode:v1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 11 and "takes DATABASE_URL from the environment" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert port_free(port), "nothing started"
