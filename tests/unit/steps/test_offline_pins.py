"""Offline plans take floating references from the lock file only: no Docker engine,
Hub or S3 is asked (none is reachable from a unit test), and a missing pin is named."""

from __future__ import annotations

import json

import pytest

from snapbuild.build import plan
from snapbuild.errors import MissingPin

RECIPE = """\
name: offu
steps:
  base: {kind: image, from: "docker://registry.invalid/team/base:1"}
  w: {kind: weights, source: "hf://acme/tiny@main", include: ["*.json"]}
"""
LOCK = {"version": 1, "builds": {"offu": {
    "base": {"source": "docker://registry.invalid/team/base:1",
             "resolved": {"image_id": "sha256:" + "a" * 64, "repo_digest": None}},
    "w": {"source": "hf://acme/tiny@main",
          "resolved": {"commit": "c" * 40, "files": {"config.json": {"size": 2}, "model.bin": {"size": 9}}}}}}}


def test_offline_pins_come_from_the_lock_file(project, store, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    path = project / "recipe.yaml"
    path.write_text(RECIPE)
    with pytest.raises(MissingPin, match="step 'base': docker://registry.invalid/team/base:1 has no pin in "
                                         "recipe.lock"):
        plan(path, store=store, offline=True)
    (project / "recipe.lock").write_text(json.dumps(LOCK))
    [p] = plan(path, store=store, offline=True)
    assert p.offline and {n: s.action for n, s in p.steps.items()} == {"base": "run", "w": "run"}
    assert p.steps["base"].material["pins"]["from"]["image_id"] == "sha256:" + "a" * 64
    # narrowed to what include selects now
    assert p.steps["w"].material["pins"] == {"commit": "c" * 40, "files": {"config.json": {"size": 2}}}


def test_hf_hub_offline_makes_a_plan_offline(project, store, monkeypatch):
    path = project / "recipe.yaml"
    path.write_text(RECIPE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingPin, match="build without --offline \\(and without HF_HUB_OFFLINE=1\\)|no pin"):
        plan(path, store=store)
