"""Content-addressed local store: blobs, chunked files, trees, step refs."""

from .blobs import BlobStore, digest_bytes
from .local import Store, StepRef, default_home

__all__ = ["BlobStore", "Store", "StepRef", "default_home", "digest_bytes"]
