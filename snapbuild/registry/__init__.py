"""Registries that hold snapshots, behind one interface (:class:`.base.Registry`),
chosen by URL scheme: ``file:///PATH``, ``s3://BUCKET/PREFIX``, ``oci://HOST[:PORT]/REPO``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from ..errors import UsageError
from .base import Registry
from .ref import GRAMMAR, Ref, locate, names_a_snapshot, parse_ref, snapshot_ref

SCHEMES = ("file", "s3", "oci")


def default_registry_url(home: Path) -> str:
    return f"file://{home / 'registry'}"


def open_registry(url: str, *, s3_endpoint: str | None = None) -> Registry:
    if names_a_snapshot(url):
        registry, _, name = url.rpartition("/")
        raise UsageError(f"registry URL {url!r} ends in a snapshot reference ({name}), where a registry was expected",
                         hint=f"give the registry, {registry} (the snapshot's name is appended), or use the full "
                              f"reference {url} in place of REF; {GRAMMAR}")
    parsed = urlparse(url)
    if parsed.scheme == "file" or (not parsed.scheme and url.startswith("/")):
        if parsed.netloc not in ("", "localhost"):
            raise UsageError(f"registry URL {url!r}: file URLs take an absolute path, file:///path")
        from .file import FileRegistry

        return FileRegistry(Path(parsed.path if parsed.scheme else url))
    if parsed.scheme == "s3":
        from .s3 import S3Registry, parse_url

        return S3Registry(*parse_url(url), endpoint_url=s3_endpoint)
    if parsed.scheme == "oci":
        from .oci import OciRegistry, parse_url

        return OciRegistry(*parse_url(url))
    raise UsageError(f"registry URL {url!r}: scheme {parsed.scheme!r} is not supported",
                     hint="use file:///absolute/path, s3://BUCKET/PREFIX or oci://HOST[:PORT]/REPO")


__all__ = ["GRAMMAR", "Ref", "Registry", "SCHEMES", "default_registry_url", "locate", "open_registry", "parse_ref",
           "snapshot_ref"]
