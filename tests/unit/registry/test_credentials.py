"""Where registry credentials are found: credHelpers, then credsStore, then auths, in
podman's then docker's files. The helpers here are stand-ins speaking docker's
credential-helper protocol (`get`, the host on stdin, JSON on stdout)."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from snapbuild.errors import RegistryError
from snapbuild.registry.credentials import credentials

HELPER = """#!{python}
import json, sys
assert sys.argv[1:] == ["get"], sys.argv
host = sys.stdin.read().strip()
with open({log!r}, "a") as f:
    f.write(host + "\\n")
known = {known!r}
if host not in known:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps({{"ServerURL": host, "Username": known[host][0], "Secret": known[host][1]}}))
"""


@pytest.fixture
def home(tmp_path, monkeypatch):
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG", "SNAPBUILD_REGISTRY_USERNAME",
                "SNAPBUILD_REGISTRY_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def helper(home: Path, name: str, known: dict) -> Path:
    log = home / f"{name}.log"
    path = home / "bin" / f"docker-credential-{name}"
    path.write_text(HELPER.format(python=sys.executable, log=str(log), known=known))
    path.chmod(0o755)
    return log


def docker_config(home: Path, doc: dict) -> None:
    path = home / "home" / ".docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def basic(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_cred_helpers_come_before_creds_store_before_auths(home):
    ecr = helper(home, "ecr-login", {"123.dkr.ecr.example:443": ("AWS", "ecr-token")})
    helper(home, "desktop", {"other.example": ("dev", "from-store"), "123.dkr.ecr.example:443": ("no", "no")})
    docker_config(home, {"credHelpers": {"123.dkr.ecr.example:443": "ecr-login"}, "credsStore": "desktop",
                         "auths": {"other.example": basic("no", "no"), "plain.example": basic("u", "p:w")}})
    assert credentials("123.dkr.ecr.example:443") == ("AWS", "ecr-token")
    assert ecr.read_text() == "123.dkr.ecr.example:443\n", "the helper is asked for the host"
    assert credentials("other.example") == ("dev", "from-store")
    assert credentials("plain.example") == ("u", "p:w"), "a helper without them gives way to auths"
    assert credentials("unknown.example") is None


def test_podman_files_come_before_docker_and_the_environment_before_all(home, monkeypatch):
    docker_config(home, {"auths": {"r.example": basic("docker", "d")}})
    assert credentials("r.example") == ("docker", "d")
    auth = home / "auth.json"
    auth.write_text(json.dumps({"auths": {"r.example": basic("podman", "p")}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    assert credentials("r.example") == ("podman", "p")
    monkeypatch.setenv("SNAPBUILD_REGISTRY_USERNAME", "env")
    monkeypatch.setenv("SNAPBUILD_REGISTRY_PASSWORD", "e")
    assert credentials("r.example") == ("env", "e")


def test_docker_config_and_xdg_runtime_dir(home, monkeypatch):
    (home / "dc").mkdir()
    (home / "dc" / "config.json").write_text(json.dumps({"auths": {"https://r.example": basic("dc", "1")}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(home / "dc"))
    assert credentials("r.example") == ("dc", "1"), "an https:// key names the host too"
    (home / "run" / "containers").mkdir(parents=True)
    (home / "run" / "containers" / "auth.json").write_text(json.dumps({"auths": {"r.example": basic("xdg", "2")}}))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home / "run"))
    assert credentials("r.example") == ("xdg", "2")


def test_a_missing_helper_says_which_file_names_it(home):
    docker_config(home, {"credHelpers": {"r.example": "ecr-login"}})
    with pytest.raises(RegistryError, match="docker-credential-ecr-login is not on PATH") as e:
        credentials("r.example")
    assert "config.json" in e.value.message and "install docker-credential-ecr-login" in e.value.hint


def test_a_failing_or_garbled_helper_is_a_registry_error_without_the_secret(home):
    path = home / "bin" / "docker-credential-broken"
    path.write_text("#!/bin/sh\necho 'keychain locked' >&2\nexit 3\n")
    path.chmod(0o755)
    docker_config(home, {"credsStore": "broken"})
    with pytest.raises(RegistryError, match=r"failed \(exit 3\): keychain locked"):
        credentials("r.example")
    path.write_text("#!/bin/sh\necho not json\n")
    with pytest.raises(RegistryError, match="did not print"):
        credentials("r.example")


def test_a_bad_auth_entry_and_a_bad_file_are_clear(home):
    docker_config(home, {"auths": {"r.example": {"auth": "!!!"}}})
    with pytest.raises(RegistryError, match=r"auths\['r.example'\].auth is not base64"):
        credentials("r.example")
    (home / "home" / ".docker" / "config.json").write_text("{not json")
    with pytest.raises(RegistryError, match="cannot read the registry auth file"):
        credentials("r.example")


def test_the_environments_pair_is_the_registrys_never_a_mirrors(home, monkeypatch, tmp_path):
    """SNAPBUILD_REGISTRY_USERNAME/PASSWORD name no host: they are the registry's own,
    so a mirror from hosts.toml (a peer node, a cache anyone on the network may run)
    that asks for credentials gets only what an auth file keeps for its host."""
    from snapbuild.registry.oci import OciRegistry

    monkeypatch.setenv("SNAPBUILD_REGISTRY_USERNAME", "ci")
    monkeypatch.setenv("SNAPBUILD_REGISTRY_PASSWORD", "s3cret")
    assert credentials("peer.internal:5000", env=False) is None
    hosts = tmp_path / "certs.d" / "registry.internal:5000"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text('server = "https://registry.internal:5000"\n'
                                      '[host."http://peer.internal:30020"]\ncapabilities = ["pull"]\n')
    monkeypatch.setenv("SNAPBUILD_HOSTS_DIR", str(tmp_path / "certs.d"))
    reg = OciRegistry("registry.internal:5000", "team")
    [mirror] = reg._mirrors
    assert reg._origin.creds == ("ci", "s3cret") and mirror.creds is None


def test_a_token_service_on_another_host_over_plain_http_gets_no_password(home, monkeypatch):
    """A 401 names the realm: credentials go there only over HTTPS (or to the registry's
    own host, or loopback), never in the clear to wherever a challenge points."""
    from snapbuild.registry.oci import OciRegistry

    monkeypatch.setenv("SNAPBUILD_REGISTRY_USERNAME", "ci")
    monkeypatch.setenv("SNAPBUILD_REGISTRY_PASSWORD", "s3cret")
    reg = OciRegistry("registry.internal:5000", "team")
    sent = []

    def fake_get(url, **kw):
        import io

        import requests
        import urllib3

        sent.append((url, kw.get("auth")))
        answer = requests.Response()  # a token service's answer, read as a stream
        answer.status_code = 200
        answer.raw = urllib3.HTTPResponse(body=io.BytesIO(b'{"token": "t"}'), preload_content=False)
        return answer

    monkeypatch.setattr(reg.session, "get", fake_get)
    for realm in ("http://tokens.elsewhere/token", "https://tokens.elsewhere/token"):
        challenge = type("R", (), {"headers": {"WWW-Authenticate": f'Bearer realm="{realm}",service="reg"'}})()
        assert reg._authenticate(reg._origin, challenge, "repository:team/x:pull")
    assert sent == [("http://tokens.elsewhere/token", None), ("https://tokens.elsewhere/token", ("ci", "s3cret"))]


def test_a_request_retried_after_a_401_carries_its_own_token(home, monkeypatch):
    """Concurrent uploads share a scope key: while this request fetched a token for its
    challenge (a cross-repository mount's, naming the source too), another thread may
    put a narrower token under that key. The retry must carry the token it got."""
    import io

    import requests
    import urllib3

    from snapbuild.registry.oci import OciRegistry

    reg = OciRegistry("127.0.0.1:5000", "team")
    sent = []

    def fake_request(method, url, headers=None, **kw):
        sent.append(headers.get("Authorization"))
        answer = requests.Response()
        answer.status_code = 401 if len(sent) == 1 else 200
        answer.headers["WWW-Authenticate"] = 'Bearer realm="http://127.0.0.1:5001/token",service="reg"'
        answer.raw = urllib3.HTTPResponse(body=io.BytesIO(b""), preload_content=False)
        return answer

    def authenticate(ep, r, scope):
        ep.auth[scope] = "Bearer narrow"  # what another thread's challenge got, meanwhile
        return "Bearer wide"

    monkeypatch.setattr(reg.session, "request", fake_request)
    monkeypatch.setattr(reg, "_authenticate", authenticate)
    assert reg.has_blob("x", "sha256:" + "0" * 64)
    assert sent == [None, "Bearer wide"]
