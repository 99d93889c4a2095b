"""Signed snapshots on real registries (file://, Debian's docker-registry, moto's S3):
`snapbuild keygen` and `sign`, and the runner's --trust-policy accepting and refusing."""

from __future__ import annotations

import base64
import json
import os
import stat
import time

import pytest

from snapbuild.registry import open_registry, parse_ref
from snapbuild.registry.base import sha256_of
from snapbuild.signing import (INDEX_TYPE, KEY_ANNOTATION, SIG_ANNOTATION, SIGNATURE_TYPE, Policy,
                               UntrustedSnapshot, _fallback_tag, _payload, key_id, verify)
from snapbuild.store.fsutil import canonical_json

pytestmark = pytest.mark.integration


@pytest.fixture(params=["file", "oci", "s3"])
def remote(request, monkeypatch, store, recipe, project, run_cli):
    """A registry of each kind holding snapshot demo:v1 (and an unsigned demo:v2)."""
    if request.param == "file":
        url = f"file://{project.parent / 'reg'}"
    elif request.param == "oci":
        url = f"oci://{request.getfixturevalue('oci_registry')}/sig{time.monotonic_ns()}"
    else:
        _, bucket = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/p"
    for tag in ("v1", "v2"):
        path = recipe(f'name: demo\nsteps:\n  a: {{kind: command, run: "echo {tag} > a.txt", outputs: [a.txt]}}\n'
                      f'publish: {{tag: "demo:{tag}"}}\n', name=f"{tag}.yaml")
        assert run_cli("build", path, "--push", url).code == 0
    return url


def policy(tmp_path, rules: dict, default: str = "reject"):
    p = tmp_path / f"policy-{time.monotonic_ns()}.json"
    p.write_text(json.dumps({"snapshots": rules, "default": default}))
    return p


def test_keygen_writes_a_private_key_only_its_owner_reads(run_cli, tmp_path):
    r = run_cli("keygen", tmp_path / "ci.key", "--json")
    assert r.code == 0, r
    assert stat.S_IMODE(os.stat(tmp_path / "ci.key").st_mode) == 0o600
    assert (tmp_path / "ci.key.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert r.json()["key_id"].startswith("sha256:")
    r = run_cli("keygen", tmp_path / "ci.key")
    assert r.code == 2 and "already exists" in r.err


def test_a_trust_policy_accepts_a_signed_snapshot_and_refuses_others(remote, run_cli, tmp_path):
    for name in ("ci", "other"):
        assert run_cli("keygen", tmp_path / f"{name}.key").code == 0
    r = run_cli("sign", "demo:v1", "--key", tmp_path / "ci.key", "--registry", remote, "--json")
    assert r.code == 0, r
    # None of these has the referrers API (distribution 2.8 answers 404): the fallback tag.
    assert r.json()["referrers"] == "fallback-tag"
    assert open_registry(remote).referrers("demo", r.json()["digest"]) is None
    ls = run_cli("ls", "--registry", remote, "--json").json()["snapshots"]
    assert sorted(x["tag"] for x in ls) == ["v1", "v2"], "the signatures' index tag is not a snapshot"

    node = {"SNAPBUILD_HOME": str(tmp_path / "node")}
    trusted = policy(tmp_path, {"demo": [str(tmp_path / "ci.key.pub")]})
    r = run_cli("pull", "demo:v1", "--registry", remote, "--trust-policy", trusted, "--json",
                tool="snapbuild-runner", env=node)
    assert r.code == 0, r
    assert r.json()["trust"]["trusted"] is True and r.json()["blobs_fetched"] > 0

    r = run_cli("pull", "demo:v2", "--registry", remote, "--trust-policy", trusted, tool="snapbuild-runner", env=node)
    assert r.code == 10 and "demo:v2" in r.err and "is not signed" in r.err, r

    wrong = policy(tmp_path, {"demo": [str(tmp_path / "other.key.pub")]})
    r = run_cli("restore", "demo:v1", "--registry", remote, "--trust-policy", wrong, tool="snapbuild-runner", env=node)
    assert r.code == 10 and "signed only by keys" in r.err and "does not accept" in r.err, r

    unnamed = policy(tmp_path, {"team/*": [str(tmp_path / "ci.key.pub")]})
    r = run_cli("pull", "demo:v1", "--registry", remote, "--trust-policy", unnamed, tool="snapbuild-runner", env=node)
    assert r.code == 10 and "has no rule for 'demo'" in r.err, r
    r = run_cli("pull", "demo:v2", "--registry", remote, "--trust-policy",
                policy(tmp_path, {}, default="accept"), tool="snapbuild-runner", env=node)
    assert r.code == 0, "default accept takes a name no rule names, unsigned"
    r = run_cli("pull", "demo:v2", "--registry", remote, tool="snapbuild-runner", env=node)
    assert r.code == 0, "without a policy, verified digests are enough, as before"


def test_a_forged_signature_is_refused(remote, run_cli, tmp_path):
    """A signature manifest that names an accepted key but whose bytes that key did not sign."""
    assert run_cli("keygen", tmp_path / "ci.key").code == 0
    trusted = Policy.load(policy(tmp_path, {"demo": [str(tmp_path / "ci.key.pub")]}))
    [kid] = [key_id(k) for k in trusted.rules[0][1]]
    reg = open_registry(remote)
    ref = parse_ref("demo:v1")
    digest = reg.resolve(ref)
    payload = _payload("demo", digest)
    for data in (payload, b"{}"):
        f = tmp_path / sha256_of(data).split(":")[1]
        f.write_bytes(data)
        reg.put_blob("demo", sha256_of(data), f)
    forged = canonical_json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "artifactType": SIGNATURE_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_of(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/vnd.snapbuild.signature.payload.v1+json", "digest": sha256_of(payload),
                    "size": len(payload), "annotations": {SIG_ANNOTATION: base64.b64encode(b"x" * 64).decode(),
                                                          KEY_ANNOTATION: kid}}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                    "size": len(reg.get_manifest("demo", digest))}})
    reg.put_manifest("demo", sha256_of(forged), forged, None)
    index = canonical_json({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256_of(forged), "size": len(forged),
         "artifactType": SIGNATURE_TYPE}]})
    reg.put_manifest("demo", sha256_of(index), index, _fallback_tag(digest))
    with pytest.raises(UntrustedSnapshot, match="does not verify"):
        verify(open_registry(remote), ref, digest, trusted)
