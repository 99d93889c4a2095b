"""The file:// registry is a valid OCI image layout per snapshot name."""

from __future__ import annotations

import json

import pytest

from snapbuild.build import build
from snapbuild.errors import NotFound, UsageError
from snapbuild.registry import open_registry, parse_ref
from snapbuild.store.snapshot import ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, parse_manifest

RECIPE = """
name: demo
vars: {v: "1"}
steps:
  a: {kind: command, run: "echo {{ v }} > a.txt", outputs: [a.txt]}
publish: {tag: "demo:{{ v }}"}
"""


def test_ref_parsing():
    assert parse_ref("demo") == parse_ref("demo:latest")
    assert parse_ref("team/demo:v1").name == "team/demo"
    r = parse_ref("demo@sha256:" + "a" * 64)
    assert r.digest and r.tag is None
    for bad in ("Demo:x", "demo:", "demo@sha256:zz", "demo:bad tag"):
        with pytest.raises(UsageError):
            parse_ref(bad)


def test_push_writes_an_oci_layout_and_tags_move(recipe, store, tmp_path):
    path = recipe(RECIPE)
    reg_url = f"file://{tmp_path / 'reg'}"
    [r1] = build(path, store=store, registry=reg_url)
    [r2] = build(path, store=store, registry=reg_url, sets={"v": "2"}, tag="demo:1")
    reg = open_registry(reg_url)
    layout = tmp_path / "reg" / "demo"
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert reg.tagged("demo") == [("1", r2.snapshot)], "pushing a tag again moves it"
    manifest = parse_manifest(reg.get_blob("demo", r2.snapshot), r2.snapshot)
    assert manifest["artifactType"] == ARTIFACT_TYPE and manifest["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    for layer in [manifest["config"], *manifest["layers"]]:
        assert (layout / "blobs" / "sha256" / layer["digest"].split(":")[1]).stat().st_size == layer["size"]
    assert reg.resolve(parse_ref(f"demo@{r1.snapshot}")) == r1.snapshot


def test_same_build_gives_same_snapshot_digest(recipe, store, tmp_path, home):
    path = recipe(RECIPE)
    [a] = build(path, store=store)
    from snapbuild.store import Store

    [b] = build(path, store=Store(tmp_path / "other-home"))
    assert a.snapshot == b.snapshot


def test_resolve_errors_say_what_exists(recipe, store):
    build(recipe(RECIPE), store=store)
    reg = open_registry(f"file://{store.home / 'registry'}")
    with pytest.raises(NotFound, match=r"tags: 1"):
        reg.resolve(parse_ref("demo:9"))
    with pytest.raises(NotFound, match="no snapshot named 'other'"):
        reg.resolve(parse_ref("other:1"))


def test_unsupported_scheme():
    with pytest.raises(UsageError, match="not supported"):
        open_registry("ftp://x/y")
