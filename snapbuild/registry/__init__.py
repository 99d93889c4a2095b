"""Registries that hold snapshots, behind one small interface, chosen by URL scheme.

Only ``file://`` exists so far; ``s3://`` and ``oci://`` plug in here.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from ..errors import UsageError
from .ref import Ref, parse_ref, snapshot_ref


def default_registry_url(home: Path) -> str:
    return f"file://{home / 'registry'}"


def open_registry(url: str):
    parsed = urlparse(url)
    if parsed.scheme == "file" or (not parsed.scheme and url.startswith("/")):
        if parsed.netloc not in ("", "localhost"):
            raise UsageError(f"registry URL {url!r}: file URLs take an absolute path, file:///path")
        from .file import FileRegistry

        return FileRegistry(Path(parsed.path if parsed.scheme else url))
    raise UsageError(f"registry URL {url!r}: scheme {parsed.scheme!r} is not supported",
                     hint="use file:///absolute/path")


__all__ = ["Ref", "default_registry_url", "open_registry", "parse_ref", "snapshot_ref"]
