"""Snapshot references: ``name[:tag]`` or ``name@sha256:<hex>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Ref:
    name: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"


def snapshot_ref(tag: str, default_name: str) -> Ref:
    """A publish tag as written in a recipe or ``--tag``: ``NAME:TAG``, or a bare ``TAG``
    that applies to ``default_name``."""
    return parse_ref(tag if ":" in tag.rsplit("/", 1)[-1] else f"{default_name}:{tag}")


def parse_ref(text: str) -> Ref:
    """Parse ``name``, ``name:tag`` or ``name@sha256:...`` (the tag defaults to ``latest``)."""
    name, at, digest = text.partition("@")
    tag = None
    if not at:
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1:]
        else:
            tag = "latest"
    if not _NAME.match(name):
        raise UsageError(f"snapshot name {name!r} in {text!r} is not valid",
                         hint="names are lower-case letters and digits separated by '.', '_', '-' or '/'")
    if tag is not None and not _TAG.match(tag):
        raise UsageError(f"tag {tag!r} in {text!r} is not valid",
                         hint="tags are up to 128 letters, digits, '_', '.' and '-'")
    if at and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise UsageError(f"digest {digest!r} in {text!r} is not a sha256 digest")
    return Ref(name=name, tag=tag, digest=digest or None)
