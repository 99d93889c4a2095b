"""Snapshot format v1: an OCI image manifest with snapbuild's own artifact type.

See docs/format.md for the full description. In short::

    manifest (application/vnd.oci.image.manifest.v1+json)
      artifactType: application/vnd.snapbuild.snapshot.v1
      config:  application/vnd.snapbuild.snapshot.config.v1+json   (what, how, provenance)
      layers:  one application/vnd.snapbuild.tree.v1+json per published output,
               then every chunk blob those trees name (zstd or raw), each once

Listing every chunk as a layer keeps registries from garbage-collecting them and lets
standard OCI clients copy a snapshot without knowing its format (tested with skopeo).
This module is shared by the build side and the runner, so it imports only the store.
"""

from __future__ import annotations

import json

from .. import __version__
from ..errors import IntegrityError
from .blobs import BlobStore
from .chunks import media_type
from .fsutil import canonical_json
from .tree import MEDIA_TYPE as TREE_MEDIA_TYPE
from .tree import load_tree

FORMAT_VERSION = 1
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.snapbuild.snapshot.v1"
CONFIG_MEDIA_TYPE = "application/vnd.snapbuild.snapshot.config.v1+json"
TITLE = "org.opencontainers.image.title"


def assemble(blobs: BlobStore, *, name: str, variant: dict, steps: list[dict],
             outputs: dict[str, str], runtime: dict | None = None,
             annotations: dict | None = None) -> tuple[str, list[str]]:
    """Write config and manifest blobs for ``outputs`` (step name -> tree digest).

    Returns the manifest digest and every blob digest it references (config included).
    The manifest holds no time stamp: the same build gives the same digest.
    """
    config = {
        "format": FORMAT_VERSION,
        "name": name,
        "variant": variant,
        "outputs": dict(sorted(outputs.items())),
        "steps": steps,
        "runtime": runtime,  # how to restore or boot it (checkpoint.json of its checkpoint step)
        "created_by": f"snapbuild {__version__}",
    }
    config_bytes = canonical_json(config)
    config_digest = blobs.put(config_bytes)

    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config_bytes)},
        "layers": chunk_layers(blobs, outputs),
        "annotations": {TITLE: name, **(annotations or {})},
    }
    digest = blobs.put(canonical_json(manifest))
    return digest, [config_digest] + [layer["digest"] for layer in manifest["layers"]]


def parse_manifest(data: bytes, digest: str, artifact_type: str = ARTIFACT_TYPE,
                   config_type: str = CONFIG_MEDIA_TYPE) -> dict:
    try:
        manifest = json.loads(data)
    except ValueError:
        raise IntegrityError(f"manifest {digest} is not JSON") from None
    if manifest.get("artifactType") != artifact_type or manifest.get("config", {}).get("mediaType") != config_type:
        what = "a snapbuild snapshot" if artifact_type == ARTIFACT_TYPE else f"a {artifact_type}"
        raise IntegrityError(f"{digest} is not {what} (artifactType {manifest.get('artifactType')!r})")
    return manifest


def chunk_layers(blobs: BlobStore, tree_digests: dict[str, str]) -> list[dict]:
    """Layer descriptors for trees (titled by step name), then every chunk they name, once."""
    layers, chunks, seen = [], [], set()
    for step_name, tree_digest in sorted(tree_digests.items()):
        layers.append({"mediaType": TREE_MEDIA_TYPE, "digest": tree_digest,
                       "size": blobs.size(tree_digest), "annotations": {TITLE: step_name}})
        seen.add(tree_digest)
        for entry in load_tree(blobs, tree_digest)["entries"]:
            for ref in entry.get("chunks", ()):
                d = ref.get("digest")
                if d and d not in seen:
                    seen.add(d)
                    chunks.append({"mediaType": media_type(ref), "digest": d, "size": blobs.size(d)})
    return layers + chunks


def referenced_blobs(manifest: dict) -> list[str]:
    return [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]


def load_config(blobs: BlobStore, manifest: dict) -> dict:
    config = json.loads(blobs.get(manifest["config"]["digest"]))
    if config.get("format") != FORMAT_VERSION:
        raise IntegrityError(f"snapshot format {config.get('format')} is not supported by this "
                             f"snapbuild (it reads format {FORMAT_VERSION})",
                             hint="upgrade snapbuild on this machine")
    return config
