"""The reference grammar: NAME:TAG with --registry, or a full reference that names its
registry (oci://, s3://, file://), as docker, skopeo, oras and crane take them."""

from __future__ import annotations

import pytest

from snapbuild.errors import UsageError
from snapbuild.registry import locate, open_registry
from snapbuild.runner.agent.config import config_from_flags, load_config

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, want", [
    ("oci://127.0.0.1:5000/team/np:2", ("np:2", "oci://127.0.0.1:5000/team")),
    ("oci://reg.example/np:2", ("np:2", "oci://reg.example")),
    (f"oci://reg.example:443/a/b/np@{DIGEST}", (f"np@{DIGEST}", "oci://reg.example:443/a/b")),
    ("oci://reg.example/team/np", ("np", "oci://reg.example/team")),  # the tag defaults to latest later
    ("s3://bucket/snapshots/np:2", ("np:2", "s3://bucket/snapshots")),
    ("s3://bucket/np:2", ("np:2", "s3://bucket")),
    ("file:///srv/registry/np:2", ("np:2", "file:///srv/registry")),
    ("np:2", ("np:2", None)),
    ("team/np:2", ("team/np:2", None)),
])
def test_a_full_reference_carries_its_registry(text, want):
    assert locate(text, None) == want


def test_a_short_reference_keeps_the_registry_option():
    assert locate("np:2", "oci://h:5000/team") == ("np:2", "oci://h:5000/team")


@pytest.mark.parametrize("text, says", [
    ("oci://h:5000/team/np:2", "leave out --registry"),
])
def test_a_full_reference_and_a_registry_option_are_one_too_many(text, says):
    with pytest.raises(UsageError, match=says):
        locate(text, "oci://other/x")


@pytest.mark.parametrize("text, says", [
    ("http://h/team/np:2", "scheme 'http' is not supported"),
    ("oci://h:5000", "expected oci://HOST"),
    ("oci://h/team/NP:2", "is not valid"),
    ("oci://h/team/np:bad tag", "is not valid"),
    ("s3://bucket", "expected s3://BUCKET/PREFIX"),
    ("file://relative/np:2", "expected file:///PATH/NAME:TAG"),
])
def test_a_malformed_full_reference_says_the_grammar(text, says):
    with pytest.raises(UsageError, match=says) as e:
        locate(text, None)
    assert "oci://HOST[:PORT]/REPO/NAME:TAG" in (e.value.hint or "") + e.value.message


@pytest.mark.parametrize("url", ["oci://h:5000/team/np:2", f"oci://h/team/np@{DIGEST}", "s3://bucket/prefix/np:2"])
def test_a_tag_where_a_registry_was_expected_shows_both_forms(url):
    with pytest.raises(UsageError, match="where a registry was expected") as e:
        open_registry(url)
    registry = url.rpartition("/")[0]
    assert f"give the registry, {registry}" in e.value.hint and "in place of REF" in e.value.hint


def test_a_port_is_not_a_tag():
    assert open_registry("oci://127.0.0.1:5000").url == "oci://127.0.0.1:5000"
    assert open_registry("oci://127.0.0.1:5000/team").url == "oci://127.0.0.1:5000/team"


def test_the_agent_takes_full_references(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('registry = "oci://default:5000/x"\n'
                   '[[server]]\nname = "a"\nref = "oci://h:5000/team/np:2"\n'
                   '[[server]]\nname = "b"\nref = "np:3"\n')
    a, b = load_config(cfg).servers
    assert (a.ref, a.registry) == ("np:2", "oci://h:5000/team"), "a full reference wins over the default"
    assert (b.ref, b.registry) == ("np:3", "oci://default:5000/x")
    cfg.write_text('[[server]]\nname = "a"\nref = "oci://h:5000/team/np:2"\nregistry = "oci://other/y"\n')
    with pytest.raises(UsageError, match="leave out --registry"):
        load_config(cfg)
    [c] = config_from_flags(["web=oci://h:5000/team/np:2:8080"]).servers
    assert (c.ref, c.registry, c.publish) == ("np:2", "oci://h:5000/team", 8080)
