"""What every registry backend provides, and the checks they share.

A backend stores content-addressed blobs and manifests per snapshot name, and tags
that point at manifests. It knows nothing of snapshots: :mod:`.transfer` moves whole
snapshots (only the blobs the other side lacks, in parallel, the manifest last).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar, runtime_checkable
from collections.abc import Callable

from ..errors import RegistryError
from .bounds import RETRY_BUDGET_S, Sizes
from .ref import Ref

T = TypeVar("T")
log = logging.getLogger(__name__)


@runtime_checkable
class Registry(Protocol):
    scheme: str
    url: str

    def has_blob(self, name: str, digest: str) -> bool:
        """Whether the blob is there (for ``name``: OCI registries keep blobs per repository)."""

    #: blob sizes from the descriptors of the manifests this client handed out or was
    #: shown (:func:`.bounds.remember`): they bound reads of those blobs by digest alone
    sizes: Sizes

    def get_blob(self, name: str, digest: str, *, size: int | None = None, into: BinaryIO | None = None) -> bytes:
        """The blob's bytes, verified against ``digest`` (fetched again once if they do
        not match). Bounded (:mod:`.bounds`): by ``size`` (its descriptor's), else by the
        size a known manifest gives it, else by ``DOCUMENT_MAX``. With ``into`` (a file
        open for writing), the bytes stream there as they come, hashed, and b'' is returned."""

    def get_manifest(self, name: str, digest: str) -> bytes:
        """A manifest's bytes, verified (OCI registries keep manifests apart from blobs),
        at most ``DOCUMENT_MAX``; the sizes its descriptors give are remembered."""

    def put_blob(self, name: str, digest: str, path: Path) -> bool | None:
        """Store the file at ``path``, whose content is ``digest``. Readers never see part of
        it. False when no bytes had to move (an OCI cross-repository mount)."""

    def put_manifest(self, name: str, digest: str, data: bytes, tag: str | None) -> None:
        """Store a manifest whose blobs are all there, and point ``tag`` at it."""

    def resolve(self, ref: Ref) -> str:
        """The manifest digest that ``ref`` names (NotFound when there is none)."""

    def names(self) -> list[str]:
        """The snapshot names in the registry."""

    def tagged(self, name: str) -> list[tuple[str, str]]:
        """(tag, manifest digest) pairs of ``name``."""

    def delete(self, ref: Ref) -> None:
        """Remove a tag, or with a digest the manifest itself (blobs stay for the registry's own gc)."""

    def referrers(self, name: str, digest: str) -> list[dict] | None:
        """Descriptors of the manifests whose ``subject`` is ``digest``, from the registry's
        referrers API; None when it has none (then the OCI fallback tag stands in)."""


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def retrying(call: Callable[[], T], what: str, *, attempts: int = 4, transient: tuple = (OSError,),
             base_delay: float = 0.25, budget_s: float = RETRY_BUDGET_S) -> T:
    """Run ``call``; on a transient error wait (exponential backoff with jitter) and try
    again, ``attempts`` times in all and none starting later than ``budget_s`` after the
    first, then fail with a RegistryError that says what."""
    t0 = time.monotonic()
    for i in range(attempts):
        try:
            return call()
        except transient as e:
            delay = base_delay * (2 ** i) * (0.5 + random.random())
            if i == attempts - 1 or time.monotonic() + delay - t0 > budget_s:
                raise RegistryError(f"{what}: {e} (tried {i + 1} times in {time.monotonic() - t0:.0f} s)",
                                    hint="check that the registry is up and reachable from here") from None
            log.warning("%s: %s; trying again in %.1f s (%d of %d)", what, e, delay, i + 2, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")
