"""A weights source that gets no answer is exit 7 with the address and a tip, never a
traceback, for each way of getting none: a refused connection, a name that does not
resolve, a TLS handshake with something that is not TLS, and a server that accepts
and never answers. Through huggingface_hub's httpx backend (whose transport errors are
not OSErrors) and through boto3. The servers are local sockets: no network needed."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from snapbuild.errors import SourceUnreachable, StepError
from snapbuild.steps.weight_sources import HubSource, S3Source
from snapbuild.steps.weights import WeightsSpec


@pytest.fixture(scope="module")
def plain_http():
    """An HTTP server: what a TLS client meets here is not TLS."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def silent():
    """Accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


def kinds(plain_http: str, silent: str) -> dict[str, str]:
    return {"refused": "http://127.0.0.1:1", "dns": "http://no-such-host.invalid",
            "tls": f"https://{plain_http}", "timeout": f"http://{silent}"}


@pytest.mark.parametrize("kind", ["refused", "dns", "tls", "timeout"])
def test_an_unreachable_hub_is_exit_7_naming_it(kind, plain_http, silent, monkeypatch):
    endpoint = kinds(plain_http, silent)[kind]
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("SNAPBUILD_HUB_TIMEOUT", "1")
    spec = WeightsSpec(kind="weights", source="hf://org/model")
    with pytest.raises(SourceUnreachable, match=f"hf://org/model: the Hub at {endpoint} cannot be reached") as e:
        HubSource().resolve(spec, None)
    assert e.value.exit_code == 7 and "HF_ENDPOINT" in (e.value.hint or "")


@pytest.mark.parametrize("kind", ["refused", "dns", "tls", "timeout"])
def test_an_unreachable_s3_is_exit_7_naming_it(kind, plain_http, silent, monkeypatch):
    endpoint = kinds(plain_http, silent)[kind]
    monkeypatch.setenv("SNAPBUILD_S3_TIMEOUT", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    spec = WeightsSpec(kind="weights", source="s3://bucket/models/x", endpoint_url=endpoint, region="us-east-1")
    with pytest.raises(SourceUnreachable, match=f"s3://bucket/models/x: S3 at {endpoint} cannot be reached") as e:
        S3Source().resolve(spec, None)
    assert e.value.exit_code == 7 and "endpoint" in (e.value.hint or "")


def test_missing_s3_credentials_are_not_unreachable(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("boto3.DEFAULT_SESSION", None)  # it caches the credentials an earlier test had
    spec = WeightsSpec(kind="weights", source="s3://bucket/x", endpoint_url="http://127.0.0.1:1", region="us-east-1")
    with pytest.raises(StepError, match="Unable to locate credentials") as e:
        S3Source().resolve(spec, None)
    assert not isinstance(e.value, SourceUnreachable) and "AWS_PROFILE" in e.value.hint


def test_the_cli_exits_7_without_a_traceback(run_cli, recipe):
    path = recipe('name: w\nsteps:\n  w: {kind: weights, source: "hf://org/model"}\n')
    r = run_cli("plan", path, env={"HF_ENDPOINT": "http://127.0.0.1:1"})
    assert r.code == 7 and "Traceback" not in r.err + r.out, r
    assert "step 'w': hf://org/model: the Hub at http://127.0.0.1:1 cannot be reached" in r.err, r.err
    r = run_cli("build", path, env={"HF_ENDPOINT": "http://127.0.0.1:1"})
    assert r.code == 7 and "Traceback" not in r.err + r.out, r
