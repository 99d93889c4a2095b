"""OCI image layers: deterministic layer tars, and reading and writing image archives.

A *normalized* layer is an uncompressed tar whose bytes depend only on the content:
entries sorted by path, modification times clamped to an epoch, owners kept as numbers
with no user or group names, no access or change times, and hard links always after
the file they name. Its digest (sha256 of the tar) is the layer's OCI ``diff_id``, and
the same content always gives the same digest, whoever built it and when.

Archives read here: ``docker save`` output (``docker-archive``), OCI image layout tars
(``oci-archive``), and a plain root filesystem tar (one layer). Written here: a
``docker-archive`` of a stored image, so that the Docker engine can load it as a base.
Standard library only (the runner reads layers too).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from collections.abc import Iterator

from ..errors import SnapbuildError
from ..store.blobs import BlobStore

# Extended headers kept from a source tar: file capabilities and other xattrs matter
# (ping needs cap_net_raw); times and names of owners do not.
_KEEP_PAX_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")


class ImageError(SnapbuildError):
    """An image archive or layer that cannot be read."""

    exit_code = 3


@dataclass
class Layer:
    digest: str  # sha256 of the uncompressed, normalized tar (the OCI diff_id)
    size: int
    path: Path
    dropped_devices: int = 0


def _open_maybe_compressed(f: BinaryIO) -> BinaryIO:
    f = f if hasattr(f, "peek") else io.BufferedReader(f)
    head = f.peek(4)[:4]
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)
    if head == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f)
    return f


def normalize(src: BinaryIO, dest: Path, *, epoch: int | None, what: str = "layer",
              set_times: bool = False) -> Layer:
    """Rewrite the tar in ``src`` (gzip or zstd allowed) as a normalized layer at ``dest``.

    ``epoch``: modification times later than it are set to it (``None`` keeps them);
    with ``set_times``, every time is set to it.
    Device nodes are left out (counted in ``dropped_devices``): a container gets its
    ``/dev`` from the runtime, and the unpacker refuses layers that carry devices.
    """
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(_open_maybe_compressed(src), spool, 1 << 20)
        spool.seek(0)
        try:
            tar = tarfile.open(fileobj=spool, mode="r:")
            members = tar.getmembers()
        except (tarfile.TarError, EOFError) as e:
            raise ImageError(f"{what} is not a readable tar archive: {e}") from None
        with tar:
            return _write_normalized(tar, members, dest, epoch, what, set_times)


def _norm_name(name: str, what: str = "layer") -> str:
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "/")]
    if ".." in parts:
        raise ImageError(f"{what}: entry {name!r} points outside the root filesystem",
                         hint="the archive is malformed or malicious; rebuild it from a trusted source")
    return "/".join(parts)


def _write_normalized(tar: tarfile.TarFile, members: list[tarfile.TarInfo], dest: Path,
                      epoch: int | None, what: str, set_times: bool = False) -> Layer:
    by_name: dict[str, tarfile.TarInfo] = {}
    dropped = 0
    for m in members:  # a later entry of the same name replaces an earlier one
        name = _norm_name(m.name, what)
        if m.ischr() or m.isblk():
            dropped += 1
            continue
        if name:
            by_name[name] = m
    # Hard-link groups: whichever name sorts first holds the data, the others link to it.
    data_of: dict[str, str] = {}  # link name -> name of the member whose data it shares
    for name, m in by_name.items():
        if m.islnk():
            target, seen = _norm_name(m.linkname, what), {name}
            while target in by_name and by_name[target].islnk() and target not in seen:
                seen.add(target)
                target = _norm_name(by_name[target].linkname, what)
            data_of[name] = target
    groups: dict[str, list[str]] = {}
    for name, target in data_of.items():
        groups.setdefault(target, [target]).append(name)
    holder: dict[str, str] = {}  # name -> first name of its group
    for names in groups.values():
        first = min(names)
        for n in names:
            holder[n] = first

    h = hashlib.sha256()

    class _Hashing(io.RawIOBase):
        def __init__(self, f):
            self.f = f
            self.n = 0

        def writable(self):
            return True

        def write(self, b):
            h.update(b)
            self.n += len(b)
            return self.f.write(b)

    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as raw:
        sink = _Hashing(raw)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as out:
            for name in sorted(by_name):
                m = by_name[name]
                src = m
                if name in holder:
                    target = data_of.get(name, name)
                    src = by_name.get(target, m)
                    if src.islnk() or target not in by_name:
                        continue  # a link to nothing in this layer: drop it
                info = tarfile.TarInfo(name)
                info.mode = src.mode
                info.uid, info.gid = src.uid, src.gid
                info.uname = info.gname = ""
                info.mtime = int(src.mtime if epoch is None else epoch if set_times else min(int(src.mtime), epoch))
                info.pax_headers = {k: v for k, v in src.pax_headers.items() if k.startswith(_KEEP_PAX_PREFIXES)}
                if name in holder and holder[name] != name:
                    info.type = tarfile.LNKTYPE
                    info.linkname = holder[name]
                    out.addfile(info)
                elif src.isreg() or name in holder:
                    info.type = tarfile.REGTYPE
                    info.size = src.size
                    out.addfile(info, tar.extractfile(src))
                else:
                    info.type = src.type
                    info.linkname = src.linkname
                    info.devmajor, info.devminor = src.devmajor, src.devminor
                    out.addfile(info)
    return Layer(digest="sha256:" + h.hexdigest(), size=sink.n, path=dest, dropped_devices=dropped)


def newest_mtime(layer: Path) -> int:
    with tarfile.open(layer, "r:") as tar:
        return max((int(m.mtime) for m in tar), default=0)


@contextlib.contextmanager
def read_archive(path: Path, kind: str) -> Iterator[tuple[dict, list[tuple[str, BinaryIO]]]]:
    """(config, [(layer name, stream)]) of a ``docker-archive`` or ``oci-archive``, as a
    context manager: the streams are valid inside the ``with`` block, read in order."""
    try:
        tar = tarfile.open(path, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise ImageError(f"{kind}:{path}: cannot read it as an image archive: {e}") from None
    with tar:
        names = set(tar.getnames())

        def read(name: str) -> bytes:
            name = name.removeprefix("./")
            member = next((m for m in (name, "./" + name) if m in names), None)
            if member is None:
                raise ImageError(f"{kind}:{path}: the archive has no {name!r}",
                                 hint=f"make it with {'docker save' if kind == 'docker-archive' else 'skopeo copy ... oci-archive:FILE'}")
            return tar.extractfile(member).read()

        def stream(name: str) -> BinaryIO:
            name = name.removeprefix("./")
            member = name if name in names else "./" + name
            return tar.extractfile(member)

        if kind == "docker-archive":
            manifest = json.loads(read("manifest.json"))
            if not manifest:
                raise ImageError(f"docker-archive:{path}: manifest.json lists no image")
            entry = manifest[0]
            config = json.loads(read(entry["Config"]))
            yield config, [(n, stream(n)) for n in entry["Layers"]]
            return
        index = json.loads(read("index.json"))
        desc = index["manifests"][0]
        blob = lambda d: f"blobs/{d.replace(':', '/')}"  # noqa: E731
        manifest = json.loads(read(blob(desc["digest"])))
        if "manifests" in manifest:  # an index of one image per platform: take the first
            manifest = json.loads(read(blob(manifest["manifests"][0]["digest"])))
        config = json.loads(read(blob(manifest["config"]["digest"])))
        yield config, [(x["digest"], stream(blob(x["digest"]))) for x in manifest["layers"]]


def write_docker_archive(dest: BinaryIO, config: dict, layers: list[Layer], tag: str) -> None:
    """A ``docker load``-able archive of an image: config and layer tars as they are."""
    cfg = json.dumps(config, sort_keys=True).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    manifest = [{"Config": cfg_name, "RepoTags": [tag],
                 "Layers": [f"{layer.digest.split(':')[1]}/layer.tar" for layer in layers]}]
    with tarfile.open(fileobj=dest, mode="w|") as out:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))

        add(cfg_name, cfg)
        for layer in layers:
            info = out.gettarinfo(str(layer.path), arcname=f"{layer.digest.split(':')[1]}/layer.tar")
            info.uname = info.gname = ""
            with open(layer.path, "rb") as f:
                out.addfile(info, f)
        add("manifest.json", json.dumps(manifest).encode())


def write_layers(blobs: BlobStore, artifact: str, out: Path) -> tuple[dict, list[Layer]]:
    """The image artifact's OCI config, and its layers written out (verified) as tar
    files in ``out``, lowest first (for a ``docker load`` archive, or a build on top)."""
    from ..runtime.container import read_image
    from ..store.chunks import write_file

    meta, entries = read_image(blobs, artifact)
    out.mkdir(parents=True, exist_ok=True)
    layers = []
    for x in meta["layers"]:
        path = out / f"{x['digest'].split(':')[1]}.tar"
        write_file(blobs, entries[f"layers/{path.name}"], path, 0o644)
        layers.append(Layer(digest=x["digest"], size=x["size"], path=path))
    return meta["config"], layers
