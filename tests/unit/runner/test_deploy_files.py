"""The deployment files in runners/: Kubernetes manifests validated against the
Kubernetes API schema (kubernetes-validate's bundled schemas, strict: no unknown
fields), the systemd unit checked by systemd-analyze, the agent configurations loaded
by the agent's own parser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snapbuild.runner.agent import load_config

REPO = Path(__file__).resolve().parents[3]
RUNNERS = REPO / "runners"
K8S_VERSION = "1.30"


def manifests():
    for path in sorted((RUNNERS / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


@pytest.mark.parametrize("name, doc", list(manifests()), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_kubernetes_manifests_match_the_api_schema(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_daemonset_has_what_criu_needs_and_a_valid_agent_config(tmp_path):
    docs = {d["kind"]: d for _, d in manifests()}
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    assert pod["hostPID"] and agent["securityContext"]["privileged"], "CRIU restores PIDs and mounts"
    paths = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    assert paths["state"] == "/var/lib/snapbuild", "the node cache on a hostPath"
    assert {m["name"]: m.get("mountPropagation") for m in agent["volumeMounts"]}["state"] == "Bidirectional"
    config = tmp_path / "agent.toml"
    config.write_text(docs["ConfigMap"]["data"]["agent.toml"])
    assert [s.name for s in load_config(config).servers] == ["embedder"]
    assert docs["RuntimeClass"]["handler"] == "runsc"
    live = agent["livenessProbe"]["httpGet"]
    assert live["path"] == "/healthz" and live["port"] == 9411, "liveness is the supervisor loop's health"


def test_the_example_agent_config_loads():
    cfg = load_config(RUNNERS / "systemd" / "agent.toml")
    assert [s.name for s in cfg.servers] == ["embedder", "llm"] and cfg.cache_max == 200 << 30
    assert cfg.servers[1].publish == 8000 and cfg.servers[0].trust_policy == "/etc/snapbuild/policy.json"


def test_the_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian's systemd package) checks the unit"
    unit = (RUNNERS / "systemd" / "snapbuild-runner.service").read_text()
    runner = Path(sys.executable).parent / "snapbuild-runner"
    (tmp_path / "snapbuild-runner.service").write_text(unit.replace("/usr/local/bin/snapbuild-runner", str(runner)))
    r = subprocess.run([analyze, "verify", str(tmp_path / "snapbuild-runner.service")], capture_output=True,
                       text=True)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "snapbuild-runner.service" in ln]
    assert r.returncode == 0 and problems == [], r.stdout + r.stderr
