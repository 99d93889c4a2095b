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
from ..schema import CONFIG_FORMAT, Runtime, SnapshotConfig, TreeImages, read_config
from .blobs import BlobStore
from .chunks import media_type
from .fsutil import canonical_json
from .securefs import unsafe_name
from .tree import MEDIA_TYPE as TREE_MEDIA_TYPE
from .tree import load_tree, tree_limits, tree_problem

FORMAT_VERSION = CONFIG_FORMAT
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.snapbuild.snapshot.v1"
CONFIG_MEDIA_TYPE = "application/vnd.snapbuild.snapshot.config.v1+json"
TITLE = "org.opencontainers.image.title"


def assemble(blobs: BlobStore, *, name: str, variant: dict, steps: list[dict],
             outputs: dict[str, str], runtime: Runtime | None = None,
             annotations: dict | None = None, tree_images: TreeImages | None = None) -> tuple[str, list[str]]:
    """Write config and manifest blobs for ``outputs`` (step name -> tree digest).

    ``runtime``: how to restore or boot the server (the checkpoint step's checkpoint.json).
    ``tree_images`` names an image tree for some input trees and layers (see
    runtime.erofs); the image trees travel in the manifest as well.
    Returns the manifest digest and every blob digest it references (config included).
    The manifest holds no time stamp: the same build gives the same digest.
    """
    config = SnapshotConfig(format=FORMAT_VERSION, name=name, variant=variant, outputs=outputs, steps=steps,
                            runtime=runtime, tree_images=tree_images, created_by=f"snapbuild {__version__}").to_json()
    shipped = dict(outputs)
    for image in tree_images.images() if tree_images else []:
        shipped[f"tree-image:{image.split(':', 1)[1][:12]}"] = image
    config_bytes = canonical_json(config)
    config_digest = blobs.put(config_bytes)

    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": len(config_bytes)},
        "layers": chunk_layers(blobs, shipped),
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
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise IntegrityError(f"manifest {digest} is not an OCI manifest")
    if manifest.get("artifactType") != artifact_type or manifest["config"].get("mediaType") != config_type:
        what = "a snapbuild snapshot" if artifact_type == ARTIFACT_TYPE else f"a {artifact_type}"
        raise IntegrityError(f"{digest} is not {what} (artifactType {manifest.get('artifactType')!r})")
    layers = manifest.get("layers")
    # Digests become file names in stores and registries: each one is checked here, first.
    if not _is_digest(manifest["config"].get("digest")) or not isinstance(layers, list) or not all(
            isinstance(x, dict) and _is_digest(x.get("digest")) and isinstance(x.get("mediaType"), str)
            and isinstance(x.get("size"), int) and not isinstance(x.get("size"), bool) and x["size"] >= 0
            for x in layers):
        raise IntegrityError(f"manifest {digest} has a config or layer that is not a valid blob descriptor",
                             hint="the registry holds a corrupt or hostile manifest; do not use it")
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


def image_selection(blobs: BlobStore, manifest: dict, config: dict) -> set[str] | None:
    """The blobs a node that mounts tree images needs (None: all of them): every blob
    but the chunks that only trees and layers shipped as images hold. Needs the config
    and the tree blobs (:func:`metadata_blobs`) in ``blobs``. A layer is the file
    ``layers/<hex>.tar`` of a container image's tree (see runtime.container)."""
    return pull_selection(blobs, manifest, config, images=True, direct=False)


def direct_trees(config: dict, *, images: bool) -> set[str]:
    """The trees a restore writes straight from the registry to their place (see
    runner.pull, ``direct``): the checkpoint's images, the server's input trees, its
    container image's tree (its layers), and with ``images`` the tree images. Each is
    written out once per node, at a path named by its digest, so the node's store need
    not hold their chunks too."""
    out = set()
    runtime = config.get("runtime") or {}
    spec = runtime.get("server") or {}
    for d in [runtime.get("artifact"), spec.get("image"), *(spec.get("inputs") or {}).values()]:
        if isinstance(d, str):
            out.add(d)
    if images:
        ti = config.get("tree_images") or {}
        for key in ("trees", "layers"):
            out.update(v for v in (ti.get(key) or {}).values() if isinstance(v, str))
    return out


def pull_selection(blobs: BlobStore, manifest: dict, config: dict, *, images: bool,
                   direct: bool) -> set[str] | None:
    """The blobs a pull stores (None: all of them). ``images``: not the chunks that only
    trees and layers shipped as images hold (:func:`image_selection`). ``direct``: not
    the whole-file chunks that only :func:`direct_trees` hold (packed small files are
    still stored: a pack is one blob for many files). Needs the config and the tree
    blobs (:func:`metadata_blobs`) in ``blobs``."""
    ti = (config.get("tree_images") or {}) if images else {}
    trees, layers = set(ti.get("trees") or ()), set(ti.get("layers") or ())
    written = direct_trees(config, images=images) if direct else set()
    if not trees and not layers and not written:
        return None
    layer_files = {f"layers/{d.split(':', 1)[1]}.tar" for d in layers}
    skip, keep = set(), set()
    for layer in manifest["layers"]:
        if layer["mediaType"] != TREE_MEDIA_TYPE:
            continue
        imaged, straight = layer["digest"] in trees, layer["digest"] in written
        for entry in load_tree(blobs, layer["digest"])["entries"]:
            dropped = imaged or entry["path"] in layer_files
            for ref in entry.get("chunks", ()):
                if "digest" in ref:
                    (skip if dropped or (straight and "offset" not in ref) else keep).add(ref["digest"])
    return set(referenced_blobs(manifest)) - (skip - keep)


def metadata_blobs(manifest: dict) -> list[str]:
    """The config and the tree blobs: what tells which chunks a snapshot has."""
    return [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]
                                             if layer["mediaType"] == TREE_MEDIA_TYPE]


def referenced_blobs(manifest: dict) -> list[str]:
    return [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]


def _is_digest(v: object) -> bool:
    import re

    return isinstance(v, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", v) is not None


def tree_layers_problem(blobs: BlobStore, manifest: dict, names: dict[str, str] | None = None) -> str | None:
    """What is wrong with the trees of a parsed manifest (None: nothing), once its tree
    blobs are in ``blobs``: every tree sound (tree.tree_problem), every chunk a tree
    names a layer of the manifest (else a registry may drop it) and every pack slice
    inside its pack. ``names`` (step -> tree) names trees in messages."""
    sizes = {x["digest"]: x["size"] for x in manifest["layers"]}
    trees = {x["digest"] for x in manifest["layers"] if x["mediaType"] == TREE_MEDIA_TYPE}
    for digest in sorted(trees):
        step = next((s for s, d in (names or {}).items() if d == digest), None)
        label = f"{f'step {step!r}, ' if step else ''}tree {digest}"
        try:
            tree = json.loads(blobs.get(digest))
        except ValueError:
            return f"{label} is not JSON"
        why = tree_problem(tree)
        if why:
            return f"{label} {why}"
        for e in tree["entries"]:
            for ref in e.get("chunks", ()):
                d = ref.get("digest")
                if d is None:
                    continue
                if d not in sizes or d in trees:
                    return f"{label} entry {e['path']!r} names chunk {d}, which the manifest does not list"
                if "offset" in ref and ref["offset"] + ref["length"] > sizes[d]:
                    return f"{label} entry {e['path']!r} is a slice past the end of its pack {d}"
    return None


def layout_problem(blobs: BlobStore, manifest: dict) -> str | None:
    """What is wrong with a parsed snapshot's format (None: nothing), once its config
    and tree blobs are in ``blobs``: every output a plain name and a tree of the
    manifest, the trees sound (:func:`tree_layers_problem`), tree images and the
    runtime naming trees of the manifest."""
    trees = {x["digest"] for x in manifest["layers"] if x["mediaType"] == TREE_MEDIA_TYPE}
    config = load_config(blobs, manifest)
    if not isinstance(config.get("name"), str) or not isinstance(config.get("outputs"), dict):
        return "the config has no name or outputs"
    for step, digest in config["outputs"].items():
        why = unsafe_name(step)
        if why:
            return f"output {step!r} {why}: an output's name is a folder's name and must be a plain name"
        if digest not in trees:
            return f"output {step!r} names {digest!r}, which is not a tree of the manifest"
    why = tree_layers_problem(blobs, manifest, config["outputs"])
    if why:
        return why
    images = config.get("tree_images")
    if images is not None:
        if not isinstance(images, dict) or images.get("format") != "erofs":
            return "tree_images is not an erofs index"
        for kind in ("trees", "layers"):
            index = images.get(kind) or {}
            if not isinstance(index, dict) or not all(_is_digest(k) and v in trees for k, v in index.items()):
                return f"tree_images {kind} must map digests to image trees of the manifest"
    runtime = config.get("runtime")
    if isinstance(runtime, dict):
        server = runtime.get("server") if isinstance(runtime.get("server"), dict) else {}
        needed = [runtime.get("artifact"), *(server.get("inputs") or {}).values()]
        needed += [server["image"]] if server.get("image") else []
        missing = [d for d in needed if d not in trees]
        if missing:
            return f"the runtime needs tree {missing[0]!r}, which is not a tree of the manifest"
    return None


def load_config(blobs: BlobStore, manifest: dict) -> dict:
    try:
        config = json.loads(blobs.get(manifest["config"]["digest"]))
    except ValueError:
        raise IntegrityError(f"snapshot config {manifest['config']['digest']} is not JSON") from None
    if not isinstance(config, dict):
        raise IntegrityError(f"snapshot config {manifest['config']['digest']} is not an object")
    if config.get("format") != FORMAT_VERSION:
        raise IntegrityError(f"snapshot format {config.get('format')} is not supported by this "
                             f"snapbuild (it reads format {FORMAT_VERSION})",
                             hint="upgrade snapbuild on this machine")
    return config


#: The version of the checks below: a snapshot that passed them is not checked again
#: while they (and the node's tree limits) stay the same. Bump it with every new rule.
CHECKS_VERSION = 2


def checks_id() -> str:
    """What a snapshot that passed :func:`check_snapshot` on this node passed: the
    version of the checks and the node's tree limits (a node that tightens them checks
    its snapshots again)."""
    limits = tree_limits()
    return f"{CHECKS_VERSION}:{limits.depth}:{limits.entries}:{limits.bytes}"


def check_snapshot(blobs, manifest: dict, where: str) -> SnapshotConfig:
    """The config of snapshot ``manifest`` (named ``where``; its config and tree blobs in
    ``blobs``), once its format (store.snapshot.layout_problem) and every field of its
    config pass, for this node; an IntegrityError (exit 5) saying what is wrong otherwise."""
    problem = layout_problem(blobs, manifest)
    if problem:
        raise IntegrityError(f"snapshot {where}: {problem}; refusing it",
                             hint="the registry or cache holds a corrupt or hostile snapshot; do not use it, "
                                  "and find out who pushed it")
    return read_config(load_config(blobs, manifest), where)
