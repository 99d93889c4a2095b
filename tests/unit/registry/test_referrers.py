"""Signatures on a registry that has the OCI 1.1 referrers API.

No registry here has that API (Debian's distribution 2.8 answers 404; the integration
tests cover that fallback), so these tests use stand-ins, and say so: a file:// registry
given a referrers API in memory, and a tiny HTTP server answering the API's one call
the way the OCI distribution spec describes it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from snapbuild.registry.base import sha256_of
from snapbuild.registry.file import FileRegistry
from snapbuild.registry.oci import OciRegistry
from snapbuild.registry.ref import Ref
from snapbuild.signing import Policy, UntrustedSnapshot, _fallback_tag, keygen, sign, verify
from snapbuild.store.fsutil import canonical_json

SUBJECT = canonical_json({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                          "artifactType": "application/vnd.snapbuild.snapshot.v1", "layers": []})


class ReferrersFileRegistry(FileRegistry):
    """A file:// registry that lists referrers itself, as an OCI 1.1 registry does."""

    def __init__(self, root):
        super().__init__(root)
        self.listed: dict[str, list[dict]] = {}

    def put_manifest(self, name, digest, data, tag):
        super().put_manifest(name, digest, data, tag)
        m = json.loads(data)
        if "subject" in m:
            self.listed.setdefault(m["subject"]["digest"], []).append(
                {"mediaType": m["mediaType"], "digest": digest, "size": len(data), "artifactType": m.get("artifactType")})

    def referrers(self, name, digest):
        return list(self.listed.get(digest, []))


@pytest.fixture
def signed_setup(tmp_path):
    reg = ReferrersFileRegistry(tmp_path / "reg")
    digest = sha256_of(SUBJECT)
    reg.put_manifest("demo", digest, SUBJECT, "v1")
    keygen(tmp_path / "ci.key")
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps({"snapshots": {"demo": [str(tmp_path / "ci.key.pub")]}}))
    return reg, digest, Policy.load(pol), tmp_path


def test_with_a_referrers_api_no_fallback_tag_is_written(signed_setup):
    reg, digest, policy, tmp = signed_setup
    out = sign(reg, Ref(name="demo", tag="v1"), tmp / "ci.key")
    assert out["referrers"] == "api" and [m["digest"] for m in reg.listed[digest]] == [out["signature"]]
    assert [t for t, _ in reg.tagged("demo")] == ["v1"], "no sha256-<hex> tag"
    assert verify(reg, Ref(name="demo", tag="v1"), digest, policy)["signature"] == out["signature"]


def test_signatures_behind_the_fallback_tag_still_count_once_the_api_exists(signed_setup):
    reg, digest, policy, tmp = signed_setup
    plain = FileRegistry(reg.root)  # signed before the registry had the API
    out = sign(plain, Ref(name="demo", tag="v1"), tmp / "ci.key")
    assert out["referrers"] == "fallback-tag" and _fallback_tag(digest) in [t for t, _ in reg.tagged("demo")]
    assert reg.referrers("demo", digest) == [] and digest not in reg.listed
    assert verify(reg, Ref(name="demo", tag="v1"), digest, policy)["trusted"] is True
    empty = ReferrersFileRegistry(tmp / "other")
    empty.put_manifest("demo", digest, SUBJECT, "v1")
    with pytest.raises(UntrustedSnapshot, match="is not signed"):
        verify(empty, Ref(name="demo", tag="v1"), digest, policy)


class _Referrers(BaseHTTPRequestHandler):
    index: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        if "/referrers/" not in self.path:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps(self.index).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_oci_registry_reads_the_referrers_api():
    digest = sha256_of(SUBJECT)
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "a" * 64,
             "size": 10, "artifactType": "application/vnd.snapbuild.signature.v1"}
    _Referrers.index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [entry]}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Referrers)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        reg = OciRegistry(f"127.0.0.1:{httpd.server_address[1]}", "team")
        assert reg.referrers("demo", digest) == [entry]
        _Referrers.index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
        assert reg.referrers("demo", digest) == [], "an empty list, not 'no API'"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_referrers_api_that_does_not_list_the_signature_yet_gets_the_fallback_tag(signed_setup):
    reg, digest, policy, tmp = signed_setup
    reg.referrers = lambda name, d: []  # an API that indexes later (some registries do)
    out = sign(reg, Ref(name="demo", tag="v1"), tmp / "ci.key")
    assert out["referrers"] == "fallback-tag" and _fallback_tag(digest) in [t for t, _ in reg.tagged("demo")]
    assert verify(reg, Ref(name="demo", tag="v1"), digest, policy)["signature"] == out["signature"]
