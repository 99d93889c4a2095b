"""``s3://BUCKET/PREFIX``: snapshots in an S3 bucket (or any S3-compatible store).

    PREFIX/blobs/sha256/<hex>            every blob and manifest, shared by all names
    PREFIX/repos/<name>/tags/<tag>       the manifest digest the tag points at

An object appears whole or not at all (a multipart upload that dies half way is not
an object), so a reader never sees part of a blob; tags are written after every blob
of their manifest. One blob namespace for the whole prefix means a chunk shared by
two snapshot names is stored and sent once.

Credentials and region come from boto3's chain (``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``,
instance roles, ...); the endpoint of an S3-compatible store from ``--s3-endpoint``,
``SNAPBUILD_S3_ENDPOINT`` or boto3's own ``AWS_ENDPOINT_URL``.

Reads are bounded as :mod:`.bounds` says: a blob by its descriptor's size, anything
else by ``DOCUMENT_MAX``, each try within a deadline over the whole object.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

from ..errors import NotFound, RegistryError, UsageError
from .. import settings
from .base import retrying
from .bounds import Deadline, Short, Sink, Sizes, deadline_for, read_verified, watch
from .ref import Ref


class S3Registry:
    scheme = "s3"

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, jobs: int = 32) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise UsageError("s3:// registries need boto3", hint="pip install boto3") from None
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        endpoint = endpoint_url or settings.get("s3_endpoint") or None
        self.client = boto3.client("s3", endpoint_url=endpoint,
                                   config=Config(max_pool_connections=max(jobs, 10),
                                                 retries={"max_attempts": 4, "mode": "standard"}))
        self.sizes = Sizes()

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else list(parts))

    def _blob_key(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        return self._key("blobs", algo, hexd)

    def _tag_key(self, name: str, tag: str) -> str:
        return self._key("repos", name, "tags", tag)

    def _call(self, what: str, fn, *args, **kw):
        """A boto3 call whose failures read as registry errors (boto3 retries on its own)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return retrying(lambda: fn(*args, **kw), f"{what} at {self.url}", attempts=2,
                            transient=(BotoCoreError, _Broken))
        except ClientError as e:
            raise self._error(e, what) from None

    def _error(self, e, what: str) -> Exception:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return _Missing()
        if code == "NoSuchBucket":
            return RegistryError(f"{what}: bucket {self.bucket!r} does not exist",
                                 hint="create it, or check the URL and --s3-endpoint")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return RegistryError(f"{what} at {self.url}: access denied ({code})",
                                 hint="check the credentials boto3 finds (AWS_PROFILE, AWS_ACCESS_KEY_ID, ...)")
        return RegistryError(f"{what} at {self.url}: {code or e}")

    # -- blobs ---------------------------------------------------------------------------
    def has_blob(self, name: str, digest: str) -> bool:
        try:
            self._call(f"checking blob {digest[:19]}", self.client.head_object, Bucket=self.bucket,
                       Key=self._blob_key(digest))
            return True
        except _Missing:
            return False

    def get_blob(self, name: str, digest: str, *, size: int | None = None, into=None) -> bytes:
        size = size if size is not None else self.sizes.get(digest)
        sink = Sink(f"blob {digest} in {self.url}", size=size, into=into)

        def fetch(sink: Sink) -> None:
            try:
                self._read(f"fetching blob {digest[:19]}", self._blob_key(digest), sink)
            except _Missing:
                raise NotFound(f"blob {digest} is not in {self.url}",
                               hint="the snapshot is incomplete there: push it again") from None

        return read_verified(fetch, sink, digest, self.url)

    def get_manifest(self, name: str, digest: str) -> bytes:
        data = self.get_blob(name, digest)
        self.sizes.note_bytes(data)
        return data

    def _read(self, what: str, key: str, sink: Sink) -> None:
        """Object ``key`` into ``sink``, each try within a deadline over the whole object."""
        from botocore.exceptions import BotoCoreError

        def attempt() -> None:
            with Deadline(deadline_for(sink.limit)) as dl:
                try:
                    obj = self.client.get_object(Bucket=self.bucket, Key=key)
                    body = obj["Body"]
                    watch(getattr(getattr(getattr(body, "_raw_stream", None), "connection", None), "sock", None))
                    try:
                        sink.take(body.read, length=obj.get("ContentLength"), encoding=obj.get("ContentEncoding"))
                    finally:
                        body.close()
                except (BotoCoreError, OSError, Short) as e:
                    if dl.passed():
                        raise dl.error(f"{what} at {self.url}", sink.count) from None
                    raise _Broken(str(e)) from None

        self._call(what, attempt)

    def put_blob(self, name: str, digest: str, path: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
        self._call(f"uploading blob {digest[:19]}", self.client.upload_file, str(path), self.bucket,
                   self._blob_key(digest), Config=config)

    # -- manifests and tags ----------------------------------------------------------------
    def put_manifest(self, name: str, digest: str, data: bytes, tag: str | None) -> None:
        self._call("writing a manifest", self.client.put_object, Bucket=self.bucket, Key=self._blob_key(digest),
                   Body=data, ContentType=json.loads(data).get("mediaType", "application/json"))
        if tag:
            self._call(f"tagging {name}:{tag}", self.client.put_object, Bucket=self.bucket,
                       Key=self._tag_key(name, tag), Body=digest.encode())

    def resolve(self, ref: Ref) -> str:
        if ref.digest:
            if not self.has_blob(ref.name, ref.digest):
                raise NotFound(f"{ref} is not in {self.url}")
            return ref.digest
        sink = Sink(f"tag {ref.name}:{ref.tag} in {self.url}", limit=1024)  # a digest
        try:
            self._read(f"resolving {ref}", self._tag_key(ref.name, ref.tag), sink)
        except _Missing:
            tags = ", ".join(t for t, _ in self.tagged(ref.name)) or "none"
            raise NotFound(f"{ref.name} has no tag {ref.tag!r} in {self.url} (tags: {tags})",
                           hint=f"list what is there with: snapbuild ls --registry {self.url}") from None
        return sink.value().decode(errors="replace").strip()

    def _tag_keys(self, name: str | None = None) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        base = self._key("repos") + "/"
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=base + (f"{name}/tags/" if name else "")):
                keys += [o["Key"][len(base):] for o in page.get("Contents", [])]
        except ClientError as e:
            raise self._error(e, "listing snapshots") from None
        except BotoCoreError as e:
            raise RegistryError(f"listing snapshots at {self.url}: {e}",
                                hint="check that the registry is up and reachable from here") from None
        return keys

    def names(self) -> list[str]:
        return sorted({k.rsplit("/tags/", 1)[0] for k in self._tag_keys() if "/tags/" in k})

    def tagged(self, name: str) -> list[tuple[str, str]]:
        tags = [k.rsplit("/tags/", 1)[1] for k in self._tag_keys(name)]
        return [(t, self.resolve(Ref(name=name, tag=t))) for t in sorted(tags)]

    def delete(self, ref: Ref) -> None:
        """A tag goes; with a digest, every tag pointing at it (the blobs stay)."""
        digest = self.resolve(ref)
        tags = [ref.tag] if ref.tag else [t for t, d in self.tagged(ref.name) if d == digest]
        for t in tags:
            self._call(f"deleting {ref.name}:{t}", self.client.delete_object, Bucket=self.bucket,
                       Key=self._tag_key(ref.name, t))

    def referrers(self, name: str, digest: str) -> None:
        return None  # no referrers API: signatures use the OCI fallback tag


class _Missing(Exception):
    pass


class _Broken(Exception):
    """An object read that broke off: worth another try."""


def parse_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if not parsed.netloc:
        raise UsageError(f"registry URL {url!r}: expected s3://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.strip("/")
