"""``weights``: model files from the Hugging Face Hub, S3 or a local folder, pinned.

```yaml
model:   {kind: weights, source: "hf://sentence-transformers/all-MiniLM-L6-v2@main",
          include: ["*.safetensors", "*.json", "*.txt"]}
shards:  {kind: weights, source: "s3://models/llama/7b/", endpoint_url: "http://127.0.0.1:9000"}
local:   {kind: weights, source: "file://../checkpoints/run-42"}
```

Floating references are resolved when the recipe is planned, and the resolution is
the step's pins (so part of its key): a Hub branch or tag becomes its commit sha and
each file's size and content hash; an S3 prefix becomes each object's version id
(versioned buckets) or its ETag, size and time; a local folder becomes each file's
content digest. The output is a tree of the selected files (path -> content), stored
in chunks: a file that two models or two revisions share is stored once.

Credentials come from where their libraries look (``HF_TOKEN`` or huggingface_hub's
login; boto3's credential chain) and never reach keys, logs or snapshots.

The spec is :mod:`.weights_spec` (the sources read it too); the sources, one per
scheme, are :mod:`.weight_sources`.
"""

from __future__ import annotations

import shutil

from ..errors import StepError
from ..store.tree import build_tree
from .base import BuildContext, PinContext
from .weight_sources import FileSource, HubSource, S3Source
from .weights_spec import WeightsSpec


class WeightsStep:
    name = "weights"
    version = 1
    Spec = WeightsSpec
    ephemeral = False

    def references(self, spec):
        return []

    def lock_entry(self, spec: WeightsSpec, pins: dict) -> dict | None:
        """Hub and S3 sources float (a branch moves, an object is replaced); a local
        folder is its content, already in the key."""
        if spec.source.startswith("file://"):
            return None
        return {"source": spec.source, "resolved": pins}

    def pins(self, spec: WeightsSpec, ctx: PinContext) -> dict:
        source = _source(spec)
        if ctx.offline and not spec.source.startswith("file://"):
            # the lock file's pins, narrowed to what include/exclude select now (a
            # pattern that widens the selection cannot be followed offline)
            pins = dict(ctx.locked_pins(spec.source))
            pins["files"] = {p: m for p, m in pins.get("files", {}).items() if spec.selected(p)}
        else:
            pins = source.resolve(spec, ctx.base_dir)
        if not pins["files"]:
            raise StepError(f"no file of {spec.source} matches include {spec.include} (exclude {spec.exclude})",
                            hint="patterns are shell-style (fnmatch) on paths relative to the source")
        return pins

    def build(self, spec: WeightsSpec, ctx: BuildContext) -> str:
        scratch = ctx.store.scratch(f"weights-{ctx.name}")
        try:
            files = _source(spec).fetch(spec, ctx, scratch)
            items = sorted(files.items())
            ctx.log.write(f"storing {len(items)} files, {sum(p.stat().st_size for _, p in items) / 2**20:.1f} MiB\n")
            digest, tree = build_tree(ctx.store.blobs, items)
            _check_against_pins(spec, tree, ctx.pins)
            return digest
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _source(spec: WeightsSpec):
    return {"hf": HubSource, "s3": S3Source, "file": FileSource}[spec.source.split("://", 1)[0]]()


def _check_against_pins(spec: WeightsSpec, tree: dict, pins: dict) -> None:
    """What was fetched must be what was planned: the same files, and where the pins
    know a content digest, the same content."""
    got = {e["path"]: e for e in tree["entries"] if e["type"] == "file"}
    want = pins["files"]
    if set(got) != set(want):
        diff = sorted(set(got) ^ set(want))
        raise StepError(f"{spec.source} changed while the build was running: {', '.join(diff[:5])}",
                        hint="build again to pick up the new state")
    for path, meta in want.items():
        sha = meta.get("sha256")
        if sha and got[path]["digest"] != f"sha256:{sha}":
            raise StepError(f"{spec.source}: {path} does not have the content its source announced "
                            f"(sha256 {sha[:12]}..., got {got[path]['digest'][7:19]}...)",
                            hint="the source is corrupt or changed; build again")
        if "size" in meta and got[path]["size"] != meta["size"]:
            raise StepError(f"{spec.source}: {path} is {got[path]['size']} bytes, expected {meta['size']}")


__all__ = ["WeightsSpec", "WeightsStep"]
