"""``image``: a container image, as deterministic OCI layers plus its config.

```yaml
base: {kind: image, from: "rootfs:fixtures/python.tar"}        # a root filesystem tar: one layer
app:
  kind: image
  from: base                       # another image step, or docker-archive:F, oci-archive:F, docker://REF
  copy: {"server/": /app/}         # from the build context (default: the recipe's folder)
  env: {PYTHONUNBUFFERED: "1"}
  workdir: /app
  run: ["python3 -m compileall -q /app"]
```

or, instead of ``copy``/``env``/``workdir``/``run``, an inline ``dockerfile:`` (everything
after ``FROM``, which snapbuild supplies). Instructions are built by the Docker engine,
with host networking. Without instructions nothing runs: the base's layers are taken
as they are, normalized.

The artifact holds ``image.json`` (the OCI image config and the layer list) and
``layers/<hex>.tar``, one normalized layer tar each (see
:mod:`snapbuild.image.layers`): identical content gives identical digests, and a layer
that several images share is stored once. The key covers the base (file digest,
registry digest or input key), the instructions, and the build context's files.
"""

from __future__ import annotations

import logging
import json
import os
import shutil
import stat
from pathlib import Path

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..errors import SnapbuildError, StepError
from ..image import layers as L
from ..runtime.container import IMAGE_JSON
from ..store.tree import build_tree
from .base import BuildContext, PinContext, StepSpec
from ..store.fsutil import file_digest
from .files import file_pin

log = logging.getLogger(__name__)

EXTERNAL_PREFIXES = ("rootfs:", "docker-archive:", "oci-archive:", "docker://")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageSpec(StepSpec):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: str = Field(alias="from")
    dockerfile: str | None = None
    copy_: dict[str, str] = Field(default_factory=dict, alias="copy")
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    run: list[str] = Field(default_factory=list)
    context: str = "."
    epoch: int | None = Field(default=None, ge=0)

    @field_validator("run", mode="before")
    @classmethod
    def _run_list(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_style(self):
        if self.dockerfile is not None and (self.copy_ or self.env or self.workdir or self.run):
            raise ValueError("give either `dockerfile:` or `copy:`/`env:`/`workdir:`/`run:`, not both")
        if self.dockerfile is not None and self.dockerfile.lstrip().upper().startswith("FROM"):
            raise ValueError("`dockerfile:` starts after FROM: the base comes from `from:`")
        return self

    def key_fields(self) -> dict:
        """The spec as written (``from``, ``copy``), except a base file's path: its
        content digest is pinned instead, so moving the tarball changes nothing."""
        out = self.model_dump(mode="json", by_alias=True, exclude=set(self.KEYLESS))
        kind, sep, _ = self.from_.partition(":")
        if sep and kind in ("rootfs", "docker-archive", "oci-archive"):
            out["from"] = kind + ":"
        return out

    def has_instructions(self) -> bool:
        return bool(self.dockerfile or self.copy_ or self.env or self.workdir or self.run)

    def base_step(self) -> str | None:
        return None if self.from_.startswith(EXTERNAL_PREFIXES) else self.from_

    def dockerfile_text(self, base: str) -> str:
        lines = [f"FROM {base}"]
        if self.dockerfile is not None:
            return "\n".join(lines) + "\n" + self.dockerfile.rstrip() + "\n"
        lines += [f"ENV {k}={json.dumps(v)}" for k, v in self.env.items()]
        if self.workdir:
            lines.append(f"WORKDIR {self.workdir}")
        lines += [f"COPY {json.dumps([src, dest])}" for src, dest in self.copy_.items()]
        lines += [f"RUN {cmd}" for cmd in self.run]
        return "\n".join(lines) + "\n"


class ImageStep:
    name = "image"
    version = 3  # 2: device nodes left out of layers; 3: times in built layers set to the epoch
    Spec = ImageSpec
    ephemeral = False

    def references(self, spec: ImageSpec):
        base = spec.base_step()
        return [(base, ("from",))] if base else []

    def lock_entry(self, spec: ImageSpec, pins: dict) -> dict | None:
        """A registry tag floats; files and other steps are pinned by content."""
        if spec.from_.startswith("docker://"):
            return {"source": spec.from_, "resolved": pins["from"]}
        return None

    def check_links(self, spec: ImageSpec, steps: dict) -> tuple[tuple, str, str] | None:
        base = spec.base_step()
        if base and steps[base].kind.name != "image":
            return (("from",), f"`from: {base}` names a {steps[base].kind.name} step, not an image step",
                    "use another image step, or rootfs:FILE, docker-archive:FILE, oci-archive:FILE, docker://REF")
        return None

    def pins(self, spec: ImageSpec, ctx: PinContext) -> dict:
        pins: dict = {}
        if not spec.base_step():
            # offline, a registry tag is the Docker engine's image by the id the lock file holds
            floating = ctx.offline and spec.from_.startswith("docker://")
            pins["from"] = ctx.locked_pins(spec.from_) if floating else _pin_external(spec.from_, ctx.base_dir)
        if spec.has_instructions():
            pins["context"] = _context_digests(spec, ctx.base_dir)
        return pins

    def build(self, spec: ImageSpec, ctx: BuildContext) -> str:
        say = lambda msg: (ctx.log.write(msg + "\n"), ctx.log.flush())  # noqa: E731
        scratch = ctx.store.scratch(f"image-{ctx.name}")
        try:
            config, layers = self._base(spec, ctx, scratch, say)
            if spec.has_instructions():
                config, layers = self._docker_build(spec, ctx, scratch, config, layers, say)
            config = _oci_config(config, layers)
            (scratch / IMAGE_JSON).write_text(json.dumps(
                {"config": config, "layers": [{"digest": x.digest, "size": x.size} for x in layers]},
                indent=2, sort_keys=True) + "\n")
            items = [(IMAGE_JSON, scratch / IMAGE_JSON), ("layers", scratch / "layers")]
            items += [(f"layers/{x.digest.split(':')[1]}.tar", x.path) for x in layers]
            digest, _ = build_tree(ctx.store.blobs, items)
            say(f"image: {len(layers)} layer(s), {sum(x.size for x in layers) / 2**20:.1f} MiB")
            return digest
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _base(self, spec, ctx, scratch: Path, say) -> tuple[dict, list[L.Layer]]:
        out = scratch / "layers"
        out.mkdir(parents=True, exist_ok=True)
        base = spec.base_step()
        if base:
            from ..image.layers import write_layers

            return write_layers(ctx.store.blobs, ctx.inputs[base], out)
        kind, _, ref = spec.from_.partition(":")
        if kind == "rootfs":
            path = (ctx.base_dir / ref).resolve()
            say(f"base: root filesystem {path}")
            with open(path, "rb") as f:
                layer = _normalized(f, out, spec.epoch, f"rootfs {ref}")
            if layer.dropped_devices:
                say(f"left out {layer.dropped_devices} device node(s) (the container runtime provides /dev)")
            return {"config": {"Env": [f"PATH={DEFAULT_PATH}"]}}, [layer]
        if kind == "docker":
            from ..image import docker

            c = docker.client()
            archive = scratch / "pulled.tar"
            image_id = ctx.pins["from"]["image_id"]
            if ctx.offline:
                try:
                    c.images.get(image_id)
                except Exception:
                    raise StepError(f"base {spec.from_}: offline, and the Docker engine has no image {image_id[:19]} "
                                    "(the id the lock file pins)",
                                    hint="pull it once where the registry can be reached, or `docker load` it, "
                                         "or build without --offline") from None
            docker.save(c, image_id, archive)
            return _read_archive(archive, "docker-archive", out, spec.epoch)
        path = (ctx.base_dir / ref).resolve()
        say(f"base: {kind} {path}")
        return _read_archive(path, kind, out, spec.epoch)

    def _docker_build(self, spec, ctx, scratch: Path, config: dict, layers: list[L.Layer], say):
        from ..image import docker

        c = docker.client()
        tag = f"snapbuild-base:{ctx.key[:16]}"
        archive = scratch / "base.tar"
        with open(archive, "wb") as f:
            L.write_docker_archive(f, _oci_config(config, layers), layers, tag)
        base_id = docker.load(c, archive)
        archive.unlink()
        context = scratch / "context"
        _copy_context(spec, ctx.base_dir, context)
        (context / ".snapbuild.Dockerfile").write_text(spec.dockerfile_text(base_id))
        say("--- Dockerfile ---\n" + spec.dockerfile_text(base_id).rstrip() + "\n---")
        image_id = None
        try:
            image_id = docker.build(c, context, ".snapbuild.Dockerfile", say, cancel=ctx.cancel)
            saved = scratch / "built.tar"
            docker.save(c, image_id, saved)
            shutil.rmtree(context)
            # Every time in the new layers is set to the epoch (default: the base's newest
            # time): neither the build's clock nor the checkout's reaches the digests.
            epoch = spec.epoch if spec.epoch is not None else max(L.newest_mtime(x.path) for x in layers)
            # The base's layers come back unchanged (the engine keeps their exact bytes): skip them.
            built_config, new = _read_archive(saved, "docker-archive", scratch / "layers", epoch,
                                              skip=len(layers), set_times=True)
        finally:
            for i in (image_id, base_id):
                if i:
                    docker.remove(c, i)
        return built_config, layers + new


def _normalized(f, out: Path, epoch: int | None, what: str, set_times: bool = False) -> L.Layer:
    tmp = out / ".incoming.tar"
    layer = L.normalize(f, tmp, epoch=epoch, what=what, set_times=set_times)
    final = out / f"{layer.digest.split(':')[1]}.tar"
    os.replace(tmp, final)
    layer.path = final
    return layer


def _read_archive(path: Path, kind: str, out: Path, epoch: int | None, *,
                  skip: int = 0, set_times: bool = False) -> tuple[dict, list[L.Layer]]:
    """The config and the layers of an archive, normalized, but for the first ``skip``."""
    out.mkdir(parents=True, exist_ok=True)
    result = []
    with L.read_archive(path, kind) as (config, streams):
        if len(streams) < skip:
            raise StepError(f"the built image has {len(streams)} layers, fewer than its base's {skip}")
        for name, stream in streams[skip:]:
            result.append(_normalized(stream, out, epoch, f"{kind}:{path.name} layer {name}", set_times))
    return config, result


def _oci_config(config: dict, layers: list[L.Layer]) -> dict:
    """An OCI image config without times or history: the same image, the same bytes."""
    inner = config.get("config") or config.get("Config") or {}
    keep = {k: inner[k] for k in ("User", "Env", "Entrypoint", "Cmd", "WorkingDir", "ExposedPorts", "Labels",
                                  "StopSignal") if inner.get(k)}
    return {"architecture": config.get("architecture", "amd64"), "os": config.get("os", "linux"),
            "config": keep, "rootfs": {"type": "layers", "diff_ids": [x.digest for x in layers]}}


def _pin_external(ref: str, base_dir: Path) -> dict:
    kind, _, rest = ref.partition(":")
    if kind == "docker":
        return _pin_registry(rest.removeprefix("//"))
    if not rest:
        raise StepError(f"base {ref!r} names no file",
                        hint="give the path after the colon (relative to the recipe's folder); if the recipe "
                             "takes it as a variable, pass it with --set, e.g. --set rootfs=PATH")
    path = (base_dir / rest).resolve()
    if not path.is_file():
        raise StepError(f"base {ref!r}: {path} does not exist" if not path.exists() else
                        f"base {ref!r}: {path} is not a file",
                        hint={"rootfs": "make one with mmdebstrap or `docker export`",
                              "docker-archive": "make one with `docker save IMAGE -o FILE`",
                              "oci-archive": "make one with `skopeo copy docker://IMAGE oci-archive:FILE`"}[kind]
                        + "; the path is relative to the recipe's folder")
    return {"file": file_digest(path)}


def _pin_registry(ref: str) -> dict:
    """A registry reference pinned to what it names now: pulled when the registry is
    reachable, else the local image of that name; its repo digest when it has one."""
    from ..image import docker

    try:
        c = docker.client()
    except SnapbuildError as e:
        raise StepError(f"base docker://{ref}: {e.message}", hint=e.hint) from None
    try:
        c.images.pull(ref)
    except Exception as e:  # unreachable registry: a local image of that name still pins it
        log.warning("docker pull %s failed (%s); pinning the Docker engine's local image of that name instead",
                    ref, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    try:
        img = c.images.get(ref)
    except Exception:
        raise StepError(f"base docker://{ref}: no such image, and it could not be pulled",
                        hint="check the name, or load it first (docker load -i FILE) and use that tag; "
                             "or use docker-archive:FILE") from None
    digests = img.attrs.get("RepoDigests") or []
    return {"image_id": img.id, "repo_digest": digests[0] if digests else None}


def _context_digests(spec: ImageSpec, base_dir: Path) -> dict:
    root = (base_dir / spec.context).resolve()
    if not root.is_dir():
        raise StepError(f"build context {spec.context!r} is not a folder (looked in {root})",
                        hint="`context:` is relative to the recipe's folder")
    sources = [root / s for s in spec.copy_] if spec.dockerfile is None else [root]
    out = {}
    for src in sources:
        if not src.exists():
            raise StepError(f"copy source {os.path.relpath(src, root)!r} does not exist in the build context "
                            f"({root})", hint="sources are relative to `context:` (default: the recipe's folder)")
        for path in [src] if src.is_file() else sorted(p for p in src.rglob("*")):
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode):
                out[rel] = file_pin(path)
    return out


def _copy_context(spec: ImageSpec, base_dir: Path, dest: Path) -> None:
    """The build context the daemon gets: only what COPY reads (hard links, not copies)."""
    root = (base_dir / spec.context).resolve()
    if spec.dockerfile is not None:
        shutil.copytree(root, dest, symlinks=True, copy_function=_link_or_copy)
        return
    dest.mkdir(parents=True)
    for src in spec.copy_:
        s, d = root / src, dest / src
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d, symlinks=True, copy_function=_link_or_copy, dirs_exist_ok=True)
        else:
            _link_or_copy(s, d)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
