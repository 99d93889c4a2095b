"""containerd's hosts.toml, as snapbuild reads it (registry/hosts.py): which file, which
hosts in which order, what each may do, and clear errors for a file that is wrong."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from snapbuild.errors import UsageError
from snapbuild.registry import hosts
from snapbuild.registry.oci import OciRegistry


def write(root: Path, folder: str, text: str) -> Path:
    path = root / folder / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_hosts_are_tried_in_file_order_then_the_server(tmp_path):
    write(tmp_path, "registry.internal:5000", """
        server = "https://registry.internal:5000"

        [host."http://localhost:30020"]
          capabilities = ["pull", "resolve"]

        [host."https://cache.internal"]
          capabilities = ["pull"]

        [host."http://localhost:30020".header]
          x-node = "n1"
    """)
    got = hosts.load("registry.internal:5000", plain=False, root=tmp_path)
    assert [m.url for m in got.mirrors] == ["http://localhost:30020/v2", "https://cache.internal/v2"]
    assert got.mirrors[0].header == (("x-node", "n1"),), "a later [host.X.header] table belongs to X"
    assert got.origin.url == "https://registry.internal:5000/v2" and not got.origin.mirror
    assert all(m.mirror for m in got.mirrors)
    assert got.source == tmp_path / "registry.internal:5000" / "hosts.toml"


def test_capabilities_default_to_pull_and_resolve_and_push_alone_is_not_for_reads(tmp_path):
    write(tmp_path, "r.internal", """
        [host."https://a.internal"]
        [host."https://b.internal"]
          capabilities = ["push"]
        [host."https://c.internal"]
          capabilities = ["PULL"]
    """)
    a, b, c = hosts.load("r.internal", plain=False, root=tmp_path).mirrors
    assert a.capabilities == {"pull", "resolve"}
    assert not b.capabilities & {"pull", "resolve"}
    assert c.capabilities == {"pull"}


@pytest.mark.parametrize("key, override, url", [
    ("https://m.internal", "false", "https://m.internal/v2"),
    ("https://m.internal/", "false", "https://m.internal/v2"),
    ("https://m.internal/cache", "false", "https://m.internal/cache/v2"),
    ("https://m.internal/cache/v2", "false", "https://m.internal/cache/v2"),
    ("https://m.internal/api/registry", "true", "https://m.internal/api/registry"),
    ("m.internal:8443", "false", "https://m.internal:8443/v2"),
])
def test_v2_is_appended_to_the_path_unless_override_path(tmp_path, key, override, url):
    write(tmp_path, "r.internal", f"""
        [host."{key}"]
          override_path = {override}
    """)
    [mirror] = hosts.load("r.internal", plain=False, root=tmp_path).mirrors
    assert mirror.url == url


def test_tls_settings_are_relative_to_the_folder(tmp_path):
    folder = write(tmp_path, "r.internal", """
        ca = "origin-ca.pem"
        [host."https://a.internal"]
          ca = ["/etc/ssl/a.pem"]
          client = [["c.pem", "c.key"]]
        [host."https://b.internal"]
          skip_verify = true
          client = "both.pem"
          dial_timeout = "1m30s"
    """).parent
    got = hosts.load("r.internal", plain=False, root=tmp_path)
    a, b = got.mirrors
    assert a.tls() == {"verify": "/etc/ssl/a.pem", "cert": (str(folder / "c.pem"), str(folder / "c.key"))}
    assert b.tls() == {"verify": False, "cert": str(folder / "both.pem")} and b.dial_timeout == 90
    assert got.origin.tls() == {"verify": str(folder / "origin-ca.pem")}


def test_several_ca_files_become_one_bundle(tmp_path):
    folder = write(tmp_path, "r.internal", """
        [host."https://a.internal"]
          ca = ["one.pem", "two.pem"]
    """).parent
    (folder / "one.pem").write_text("ONE\n")
    (folder / "two.pem").write_text("TWO")
    [a] = hosts.load("r.internal", plain=False, root=tmp_path).mirrors
    assert Path(a.tls()["verify"]).read_text() == "ONE\nTWO\n"


def test_host_port_folders_then_default(tmp_path):
    write(tmp_path, "_default", '[host."http://fallback.internal"]\n')
    write(tmp_path, "127.0.0.1_5000_", '[host."http://escaped.internal"]\n')
    assert [m.url for m in hosts.load("127.0.0.1:5000", plain=True, root=tmp_path).mirrors] == \
        ["http://escaped.internal/v2"], "containerd's HOST_PORT_ spelling"
    write(tmp_path, "127.0.0.1:5000", '[host."http://colon.internal"]\n')
    assert [m.url for m in hosts.load("127.0.0.1:5000", plain=True, root=tmp_path).mirrors] == \
        ["http://colon.internal/v2"], "HOST:PORT first"
    other = hosts.load("127.0.0.1:6000", plain=True, root=tmp_path)
    assert [m.url for m in other.mirrors] == ["http://fallback.internal/v2"], "_default for a host with no folder"
    assert other.origin.url == "http://127.0.0.1:6000/v2", "the origin is still the registry itself"
    assert hosts.load("127.0.0.1", plain=True, root=tmp_path).mirrors[0].url == "http://fallback.internal/v2", \
        "a folder for HOST:PORT is not one for HOST"


def test_a_folder_without_hosts_toml_means_the_origin_alone(tmp_path):
    (tmp_path / "r.internal").mkdir()
    write(tmp_path, "_default", '[host."http://fallback.internal"]\n')
    got = hosts.load("r.internal", plain=False, root=tmp_path)
    assert got.mirrors == () and got.source is None and got.origin.url == "https://r.internal/v2"


def test_no_folder_at_all_is_the_origin_alone_with_todays_scheme(tmp_path):
    assert hosts.load("r.internal:5000", plain=False, root=tmp_path / "none").origin.url == "https://r.internal:5000/v2"
    assert hosts.load("127.0.0.1:5000", plain=True, root=tmp_path / "none").origin.url == "http://127.0.0.1:5000/v2"
    assert hosts.load("r.internal", plain=False, root=tmp_path / "none").origin.tls() == {}


def test_docker_io_is_read_from_registry_1(tmp_path):
    assert hosts.load("docker.io", plain=False, root=tmp_path).origin.url == "https://registry-1.docker.io/v2"
    write(tmp_path, "docker.io", '[host."http://localhost:30020"]\n  capabilities = ["pull", "resolve"]\n')
    got = hosts.load("docker.io", plain=False, root=tmp_path)
    assert [m.url for m in got.mirrors] == ["http://localhost:30020/v2"]
    assert got.origin.url == "https://registry-1.docker.io/v2"


def test_snapbuild_hosts_dir_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SNAPBUILD_HOSTS_DIR", str(tmp_path))
    assert hosts.hosts_dir() == tmp_path
    monkeypatch.delenv("SNAPBUILD_HOSTS_DIR")
    assert hosts.hosts_dir() == Path("/etc/containerd/certs.d")


def test_mirror_requests_carry_ns_and_the_origins_do_not(tmp_path, monkeypatch):
    write(tmp_path, "127.0.0.1:5000", '[host."http://127.0.0.1:30020"]\n')
    monkeypatch.setenv("SNAPBUILD_HOSTS_DIR", str(tmp_path))
    reg = OciRegistry("127.0.0.1:5000", "team")
    [mirror] = reg._mirrors
    assert mirror.url("/team/np/blobs/sha256:ab") == "http://127.0.0.1:30020/v2/team/np/blobs/sha256:ab?ns=127.0.0.1:5000"
    assert mirror.url("/_catalog?n=10").endswith("?n=10&ns=127.0.0.1:5000")
    assert reg._origin.url("/team/np/blobs/sha256:ab") == "http://127.0.0.1:5000/v2/team/np/blobs/sha256:ab"
    assert mirror.creds_host == "127.0.0.1:30020" and reg._origin.creds_host == "127.0.0.1:5000"


@pytest.mark.parametrize("text, message", [
    ('[host."https://m"\n', "not valid TOML.*line 1"),
    ('host = "https://m"\n', "'host' must be tables"),
    ('[host."https://m"]\ncapabilities = ["pull", "fetch"]\n', "host.\"https://m\": unknown capability 'fetch'"),
    ('[host."https://m"]\ncapabilities = "pull"\n', "capabilities must be a list"),
    ('[host."ftp://m"]\n', "is not an http:// or https:// URL"),
    ('[host."https://m"]\noverride_path = "yes"\n', "override_path must be true or false"),
    ('[host."https://m"]\nskip_verify = 1\n', "skip_verify must be true or false"),
    ('[host."https://m"]\nca = 3\n', "ca must be a file name"),
    ('[host."https://m"]\nclient = [["a"]]\n', "client entry"),
    ('[host."https://m"]\ndial_timeout = "soon"\n', "dial_timeout 'soon' is not a duration"),
    ('[host."https://m".header]\nx = 1\n', "header 'x' must be a string"),
    ('server = 5\n', "'server' must be a URL string"),
])
def test_a_malformed_file_is_a_usage_error_naming_it(tmp_path, text, message):
    path = write(tmp_path, "r.internal", text)
    with pytest.raises(UsageError, match=message) as e:
        hosts.load("r.internal", plain=False, root=tmp_path)
    assert str(path) in e.value.message and e.value.exit_code == 2 and e.value.hint


def test_an_unreadable_file_is_a_usage_error(tmp_path):
    path = write(tmp_path, "r.internal", "")
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(UsageError, match="cannot read the registry host configuration"):
        hosts.load("r.internal", plain=False, root=tmp_path)
