"""Signed snapshots: ed25519 signatures stored beside the snapshot, and a trust policy.

A signature is a small OCI artifact whose ``subject`` is the snapshot's manifest (an
OCI referrer)::

    manifest  artifactType application/vnd.snapbuild.signature.v1, subject: the snapshot
      config  application/vnd.oci.empty.v1+json  ({})
      layer   the signed payload: {"type", "name", "manifest"} as canonical JSON, with the
              signature (base64) and the key's id in its annotations

A registry with the OCI 1.1 referrers API lists the signature by itself; registries
without it (distribution 2.8, ``file://``, ``s3://``) get the OCI 1.1 fallback: an image
index tagged ``sha256-<hex of the snapshot's digest>`` that lists the snapshot's
referrers. Verification reads both, so signatures survive a registry's upgrade. The
signature covers the snapshot's name and manifest digest; the manifest covers every
blob by digest, so a signature vouches for all of it.

A trust policy (JSON) says which public keys may sign which snapshot names::

    {"snapshots": {"torch-mlp": ["keys/ci.pub"], "team/*": ["keys/ci.pub", "keys/release.pub"]},
     "default": "reject"}

Names match shell-style patterns, the first that matches wins; a name no pattern
matches is refused (``"default": "reject"``), or taken unsigned (``"accept"``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import NotFound, SnapbuildError, UsageError
from .registry.base import Registry, sha256_of
from .registry.ref import Ref
from .store.fsutil import canonical_json
from .store.snapshot import MANIFEST_MEDIA_TYPE

SIGNATURE_TYPE = "application/vnd.snapbuild.signature.v1"
PAYLOAD_TYPE = "application/vnd.snapbuild.signature.payload.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
SIG_ANNOTATION = "dev.snapbuild.signature"
KEY_ANNOTATION = "dev.snapbuild.key-id"


class UntrustedSnapshot(SnapbuildError):
    """The trust policy refuses the snapshot: unsigned, or signed by no accepted key."""

    exit_code = 10


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a runner installed without it
        raise UsageError("signatures need the `cryptography` package", hint="pip install cryptography") from None
    return serialization, ed25519


def keygen(path: Path) -> tuple[Path, Path]:
    """A new ed25519 key pair: ``path`` (private, PEM, mode 0600) and ``path.pub``."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise UsageError(f"{p} already exists; not overwriting a key", hint="choose another path")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


def load_private_key(path: Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the private key {path}: {e}",
                         hint="make one with: snapbuild keygen PATH") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{path} is not an ed25519 key", hint="make one with: snapbuild keygen PATH")
    return key


def load_public_key(path: Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the public key {path}: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"{path} is not an ed25519 public key")
    return key


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _payload(name: str, digest: str) -> bytes:
    return canonical_json({"type": SIGNATURE_TYPE, "name": name, "manifest": digest})


_FALLBACK_TAG = re.compile(r"^sha256-[0-9a-f]{64}$")


def _fallback_tag(digest: str) -> str:
    return digest.replace(":", "-")


def is_referrers_tag(tag: str) -> bool:
    """Whether ``tag`` is a referrers index (signatures), not a snapshot's tag."""
    return bool(_FALLBACK_TAG.match(tag))


def sign(reg: Registry, ref: Ref, key_path: Path, digest: str | None = None) -> dict:
    """Sign snapshot ``ref`` in ``reg`` and store the signature there, as a referrer.
    With ``digest``, that manifest is signed, whatever the tag names by now."""
    key = load_private_key(key_path)
    at_origin = getattr(reg, "at_origin", None)  # what it reads, it writes on: no mirror's stale copy
    if at_origin is not None:
        reg = at_origin()
    digest = digest or reg.resolve(ref)
    subject_bytes = reg.get_manifest(ref.name, digest)
    payload = _payload(ref.name, digest)
    signature = base64.b64encode(key.sign(payload)).decode()
    kid = key_id(key.public_key())
    with tempfile.TemporaryDirectory(prefix="snapbuild-sign-") as scratch:
        for data in (payload, b"{}"):  # registries take blobs as files
            d = sha256_of(data)
            path = Path(scratch) / d.split(":")[1]
            path.write_bytes(data)
            reg.put_blob(ref.name, d, path)
    manifest = {
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": SIGNATURE_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": sha256_of(b"{}"), "size": 2},
        "layers": [{"mediaType": PAYLOAD_TYPE, "digest": sha256_of(payload), "size": len(payload),
                    "annotations": {SIG_ANNOTATION: signature, KEY_ANNOTATION: kid}}],
        "subject": {"mediaType": MANIFEST_MEDIA_TYPE, "digest": digest, "size": len(subject_bytes)},
    }
    data = canonical_json(manifest)
    sig_digest = sha256_of(data)
    reg.put_manifest(ref.name, sig_digest, data, None)
    listed = reg.referrers(ref.name, digest)
    # No referrers API, or one that does not list the signature (yet): an index of the
    # subject's referrers, under a tag of its own.
    in_api = listed is not None and any(m.get("digest") == sig_digest for m in listed)
    if not in_api:
        index = _fallback_index(reg, ref.name, digest)
        entry = {"mediaType": MANIFEST_MEDIA_TYPE, "digest": sig_digest, "size": len(data),
                 "artifactType": SIGNATURE_TYPE, "annotations": {KEY_ANNOTATION: kid}}
        if not any(m["digest"] == sig_digest for m in index["manifests"]):
            index["manifests"].append(entry)
            blob = canonical_json(index)
            reg.put_manifest(ref.name, sha256_of(blob), blob, _fallback_tag(digest))
    return {"ref": str(ref), "digest": digest, "signature": sig_digest, "key_id": kid, "registry": reg.url,
            "referrers": "api" if in_api else "fallback-tag"}


def unverified_cache_steps(reg: Registry, ref: Ref, digest: str) -> list[dict]:
    """The steps of snapshot ``digest`` that nothing vouches for: taken from a remote
    build cache without ``--cache-trust``, or built from such a step (its config records
    them as ``unverified_cache``; see remote_cache)."""
    from .schema import SnapshotConfig
    from .store.snapshot import parse_manifest

    manifest = parse_manifest(reg.get_manifest(ref.name, digest), digest)
    try:
        doc = json.loads(reg.get_blob(ref.name, manifest["config"]["digest"]))
    except ValueError:
        doc = None
    steps = SnapshotConfig.from_json(doc, f"snapshot {ref} config").steps
    return [s for s in steps if s.get("unverified_cache")]


def sign_snapshot(reg: Registry, ref: Ref, key_path: Path, *, allow_unverified_cache: bool = False) -> dict:
    """``snapbuild sign``: sign snapshot ``ref``, unless it holds steps nothing vouches
    for (a signature would make nodes trust a remote cache's writers). With
    ``allow_unverified_cache`` it signs anyway; the result lists those steps."""
    load_private_key(key_path)  # a bad key fails before anything is read
    at_origin = getattr(reg, "at_origin", None)
    if at_origin is not None:
        reg = at_origin()
    digest = reg.resolve(ref)
    steps = unverified_cache_steps(reg, ref, digest)
    names = ", ".join(_from_where(s) for s in steps)
    if steps and not allow_unverified_cache:
        raise UntrustedSnapshot(
            f"not signing {ref} ({digest[:19]}): steps came from a remote build cache that nothing verified: {names}",
            hint="whoever can write that cache chose their results: forget the build store's results "
                 "(`snapbuild cache gc --older-than 0s`) and build it again with --cache-from URL --cache-trust "
                 "PUBKEY, or without --cache-from; or sign anyway with --allow-untrusted-cache")
    return sign(reg, ref, key_path, digest=digest) | {"unverified_cache": steps}


def _from_where(step: dict) -> str:
    """``NAME (from URL)`` or ``NAME (built from A, B)``: where an unverified step came from."""
    record = step.get("unverified_cache")
    record = record if isinstance(record, dict) else {}
    if record.get("registry"):
        return f"{step.get('name')} (from {record['registry']})"
    built = record.get("built_from") or []
    return f"{step.get('name')} (built from {', '.join(map(str, built))})" if built else str(step.get("name"))


def _fallback_index(reg: Registry, name: str, digest: str) -> dict:
    try:
        idx_digest = reg.resolve(Ref(name=name, tag=_fallback_tag(digest)))
        index = json.loads(reg.get_manifest(name, idx_digest))
        if index.get("mediaType") == INDEX_TYPE:
            return index
    except NotFound:
        pass
    return {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}


def _referrers(reg: Registry, name: str, digest: str) -> list[dict]:
    """The snapshot's referrers: from the registry's API when it has one, and from the
    fallback tag (signatures made before the registry had the API)."""
    listed = reg.referrers(name, digest) or []
    known = {m.get("digest") for m in listed}
    return listed + [m for m in _fallback_index(reg, name, digest)["manifests"] if m.get("digest") not in known]


@dataclass
class Policy:
    rules: list[tuple[str, list]]  # (pattern, public keys)
    default: str  # "reject" | "accept"
    path: Path

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"cannot read the trust policy {path}: {e.strerror}") from None
        except ValueError as e:
            raise UsageError(f"trust policy {path} is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("snapshots", {}), dict):
            raise UsageError(f"trust policy {path}: expected {{\"snapshots\": {{NAME_PATTERN: [PUBLIC_KEY_FILE, "
                             "...]}, \"default\": \"reject\"}}")
        default = doc.get("default", "reject")
        if default not in ("reject", "accept"):
            raise UsageError(f"trust policy {path}: default must be \"reject\" or \"accept\", not {default!r}")
        base = Path(path).parent
        rules = [(pat, [load_public_key(base / k) for k in keys]) for pat, keys in doc.get("snapshots", {}).items()]
        return cls(rules=rules, default=default, path=Path(path))

    def keys_for(self, name: str) -> list | None:
        for pattern, keys in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                return keys
        return None


NODE_POLICY = Path("/etc/snapbuild/policy.json")
UNVERIFIED_WARNING = ("snapshots are not verified: no trust policy (give --trust-policy, set "
                      "$SNAPBUILD_TRUST_POLICY, or write /etc/snapbuild/policy.json)")


def node_policy(explicit: Path | str | None = None) -> Path | None:
    """The trust policy that applies on this node: ``explicit`` (a flag or the agent's
    config), else ``$SNAPBUILD_TRUST_POLICY``, else ``/etc/snapbuild/policy.json`` when
    it exists (the way ``/etc/containers/policy.json`` works for Podman); None when there
    is none. A path named by the flag or the variable must exist (a typo must not turn
    verification off), so it is returned as given and Policy.load says what is wrong."""
    if explicit:
        return Path(explicit)
    from . import settings

    named = settings.get("trust_policy")
    if named:
        return Path(named)
    return NODE_POLICY if NODE_POLICY.exists() else None


def verify(reg: Registry, ref: Ref, digest: str, policy: Policy) -> dict:
    """Check snapshot ``digest`` (named ``ref``) against the policy; raise UntrustedSnapshot
    with the reason when it is refused. Returns how it was accepted."""
    keys = policy.keys_for(ref.name)
    if keys is None:
        if policy.default == "accept":
            return {"trusted": False, "reason": f"no rule of {policy.path} names {ref.name}; default accept"}
        raise UntrustedSnapshot(f"{ref}: the trust policy {policy.path} has no rule for {ref.name!r} and refuses "
                                "what it does not name", hint="add the name (or a pattern) with its signing keys")
    accepted = {key_id(k): k for k in keys}
    seen = []
    for entry in _referrers(reg, ref.name, digest):
        if entry.get("artifactType") != SIGNATURE_TYPE:
            continue
        try:
            sig_manifest = json.loads(reg.get_manifest(ref.name, entry["digest"]))
            layer = sig_manifest["layers"][0]
            payload = reg.get_blob(ref.name, layer["digest"])
        except (SnapbuildError, KeyError, IndexError, ValueError):
            continue
        kid = layer.get("annotations", {}).get(KEY_ANNOTATION, "")
        seen.append(kid)
        if sig_manifest.get("subject", {}).get("digest") != digest or payload != _payload(ref.name, digest):
            continue  # a signature of something else
        key = accepted.get(kid)
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(layer["annotations"][SIG_ANNOTATION]), payload)
        except Exception:  # noqa: BLE001 - cryptography's InvalidSignature, or a bad encoding
            raise UntrustedSnapshot(f"{ref}: the signature by key {kid[:19]} does not verify: the snapshot or its "
                                    "signature was altered", hint="do not run it; sign it again from a trusted "
                                                                  "build if the snapshot is genuine") from None
        return {"trusted": True, "key_id": kid, "signature": entry["digest"]}
    if not seen:
        raise UntrustedSnapshot(f"{ref} ({digest[:19]}) is not signed, and the trust policy {policy.path} "
                                f"requires a signature for {ref.name!r}",
                                hint=f"sign it: snapbuild sign {ref} --key KEY --registry URL")
    raise UntrustedSnapshot(f"{ref} ({digest[:19]}) is signed only by keys the trust policy {policy.path} does not "
                            f"accept for {ref.name!r} ({', '.join(k[:19] for k in seen)})",
                            hint="add the signer's public key to the policy, or sign with an accepted key")
