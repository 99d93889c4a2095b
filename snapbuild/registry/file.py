"""``file://`` registry: one OCI image layout per snapshot name.

    ROOT/<name>/oci-layout
    ROOT/<name>/index.json        tags as org.opencontainers.image.ref.name annotations
    ROOT/<name>/blobs/sha256/<hex>

This is the standard OCI layout: ``skopeo inspect --raw oci:ROOT/<name>:<tag>`` reads it
and ``skopeo copy`` copies it with the digest unchanged (tested). Blobs are hard-linked
from the source store when both sit on one filesystem, else copied and verified. The
index is replaced atomically under a lock, after every blob it names is in place: a
crash mid-push leaves the old tags.

Reads are bounded as :mod:`.bounds` says (by the descriptor's size, else
``DOCUMENT_MAX``): a blob must be a regular file of that size, checked before it is
read (a FIFO or a device is never opened for a blocking read).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import IntegrityError, NotFound, RegistryError
from ..store.blobs import BlobStore
from ..store.fsutil import atomic_write, flock, read_json
from ..store.snapshot import MANIFEST_MEDIA_TYPE
from .bounds import Short, Sink, Sizes, read_verified
from .ref import Ref

INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


class FileRegistry:
    scheme = "file"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self.sizes = Sizes()

    def _repo(self, name: str) -> Path:
        return self.root / name

    def _blobs(self, name: str) -> BlobStore:
        return BlobStore(self._repo(name), self._repo(name) / ".tmp")

    def _index(self, name: str) -> dict:
        try:
            return read_json(self._repo(name) / "index.json")
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
        except ValueError as e:
            raise RegistryError(f"{self._repo(name) / 'index.json'} is not valid JSON: {e}") from None

    def _write_index(self, name: str, index: dict) -> None:
        """Replace ``index.json`` atomically (callers hold ``.index.lock``)."""
        atomic_write(self._repo(name) / "index.json", json.dumps(index, indent=2).encode() + b"\n")

    # -- write -------------------------------------------------------------------------
    def has_blob(self, name: str, digest: str) -> bool:
        return self._blobs(name).has(digest)

    def put_blob(self, name: str, digest: str, path: Path) -> None:
        """Hard-link the blob when the source sits on the same filesystem (blobs are
        immutable and never written in place), else copy it, verified."""
        repo = self._repo(name)
        dest = self._blobs(name)
        try:
            if not (repo / "oci-layout").exists():
                repo.mkdir(parents=True, exist_ok=True)
                atomic_write(repo / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}\n')
            if dest.has(digest):
                return
            final = dest.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, final)
                return
            except FileExistsError:
                return
            except OSError:
                pass
            dest.put_file(Path(path), digest)
        except OSError as e:
            raise RegistryError(f"cannot write to registry {self.url}: {e}") from None

    def put_manifest(self, name: str, digest: str, data: bytes, tag: str | None) -> None:
        """The manifest as a blob, then the tag: the index is replaced atomically under a
        lock, after every blob it names is in place."""
        repo = self._repo(name)
        try:
            if not self._blobs(name).has(digest):
                self._blobs(name).put(data)
        except OSError as e:
            raise RegistryError(f"cannot write to registry {self.url}: {e}") from None
        if not tag:
            return
        with flock(repo / ".index.lock"):
            index = self._index(name)
            if any(m["digest"] == digest and m.get("annotations", {}).get(REF_NAME) == tag
                   for m in index["manifests"]):
                return  # already tagged: a no-op rebuild writes nothing
            manifests = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
            doc = json.loads(data)
            entry = {"mediaType": doc.get("mediaType", MANIFEST_MEDIA_TYPE), "digest": digest, "size": len(data),
                     "annotations": {REF_NAME: tag}}
            if doc.get("artifactType"):
                entry["artifactType"] = doc["artifactType"]
            manifests.append(entry)
            index["manifests"] = sorted(manifests, key=lambda m: m["annotations"][REF_NAME])
            self._write_index(name, index)

    def delete(self, ref: Ref) -> None:
        digest = self.resolve(ref)
        repo = self._repo(ref.name)
        with flock(repo / ".index.lock"):
            index = self._index(ref.name)
            index["manifests"] = [m for m in index["manifests"]
                                  if not (m.get("annotations", {}).get(REF_NAME) == ref.tag if ref.tag
                                          else m["digest"] == digest)]
            self._write_index(ref.name, index)

    # -- read --------------------------------------------------------------------------
    def resolve(self, ref: Ref) -> str:
        """The manifest digest ``ref`` names."""
        if not self._repo(ref.name).is_dir():
            raise NotFound(f"no snapshot named {ref.name!r} in {self.url}",
                           hint=f"list what is there with: snapbuild ls --registry {self.url}")
        if ref.digest:
            if not self._blobs(ref.name).has(ref.digest):
                raise NotFound(f"{ref} is not in {self.url}")
            return ref.digest
        for m in self._index(ref.name)["manifests"]:
            if m.get("annotations", {}).get(REF_NAME) == ref.tag:
                return m["digest"]
        tags = ", ".join(self.tags(ref.name)) or "none"
        raise NotFound(f"{ref.name} has no tag {ref.tag!r} in {self.url} (tags: {tags})")

    def get_blob(self, name: str, digest: str, *, size: int | None = None, into=None) -> bytes:
        path = self.blob_path(name, digest)
        size = size if size is not None else self.sizes.get(digest)
        sink = Sink(f"blob {digest} in {self.url}/{name}", size=size, into=into)

        def read(sink: Sink) -> None:
            try:
                # O_NONBLOCK: opening a FIFO planted as a blob must not wait for a writer
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFound(f"blob {digest} is not in {self._repo(name)}") from None
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise IntegrityError(f"{sink.what} is not a regular file ({path}); refused",
                                         hint=f"delete it (rm {path}) and publish the snapshot again")
                sink.take(f.read, length=st.st_size)

        try:
            return read_verified(read, sink, digest, f"{self.url}/{name}", attempts=1)
        except (IntegrityError, Short) as e:  # Short: the file changed while read
            # Publishing skips blobs the registry already has, so the bad copy must go first.
            raise IntegrityError(str(e), hint=f"delete it (rm {path}) and publish the snapshot again: "
                                              "snapbuild build RECIPE --tag ...") from None

    def get_manifest(self, name: str, digest: str) -> bytes:
        data = self.get_blob(name, digest)
        self.sizes.note_bytes(data)
        return data

    def blob_path(self, name: str, digest: str) -> Path:
        return self._blobs(name).path(digest)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(str(p.parent.relative_to(self.root)) for p in self.root.rglob("oci-layout"))

    def tags(self, name: str) -> list[str]:
        return [t for t, _ in self.tagged(name)]

    def tagged(self, name: str) -> list[tuple[str, str]]:
        """(tag, manifest digest) pairs."""
        return [(m["annotations"][REF_NAME], m["digest"]) for m in self._index(name)["manifests"]
                if REF_NAME in m.get("annotations", {})]

    def referrers(self, name: str, digest: str) -> None:
        return None  # no referrers API: signatures use the OCI fallback tag
