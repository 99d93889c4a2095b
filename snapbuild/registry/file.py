"""``file://`` registry: one OCI image layout per snapshot name.

    ROOT/<name>/oci-layout
    ROOT/<name>/index.json        tags as org.opencontainers.image.ref.name annotations
    ROOT/<name>/blobs/sha256/<hex>

This is the standard OCI layout: ``skopeo inspect --raw oci:ROOT/<name>:<tag>`` reads it
and ``skopeo copy`` copies it with the digest unchanged (tested). Blobs are hard-linked
from the source store when both sit on one filesystem, else copied and verified. The
index is replaced atomically under a lock, after every blob it names is in place: a
crash mid-push leaves the old tags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import IntegrityError, NotFound, RegistryError
from ..store.blobs import BlobStore
from ..store.fsutil import atomic_write, flock, read_json
from ..store.snapshot import MANIFEST_MEDIA_TYPE
from .ref import Ref

INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


class FileRegistry:
    scheme = "file"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"

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

    def get_blob(self, name: str, digest: str) -> bytes:
        try:
            return self._blobs(name).get(digest)
        except IntegrityError as e:
            # Publishing skips blobs the registry already has, so the bad copy must go first.
            raise IntegrityError(f"registry {self.url}: {e.message}",
                                 hint=f"delete it (rm {self.blob_path(name, digest)}) and publish the "
                                      "snapshot again: snapbuild build RECIPE --tag ...") from None

    get_manifest = get_blob

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
