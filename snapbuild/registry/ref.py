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


SCHEMES_WITH_REFS = ("oci", "s3", "file")
GRAMMAR = ("a snapshot is named NAME:TAG or NAME@sha256:HEX with --registry URL, or by a full reference: "
           "oci://HOST[:PORT]/REPO/NAME:TAG, s3://BUCKET/PREFIX/NAME:TAG or file:///PATH/NAME:TAG "
           "(@sha256:HEX in place of :TAG)")


def split_full(text: str) -> tuple[str, str] | None:
    """A full reference ``SCHEME://.../NAME[:TAG|@DIGEST]`` as (registry URL, NAME...),
    or None when ``text`` has no scheme. The registry is everything before the last
    ``/``: the snapshot's name is the last path component, the part a registry URL
    would have appended."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return None
    if scheme not in SCHEMES_WITH_REFS:
        raise UsageError(f"reference {text!r}: scheme {scheme!r} is not supported", hint=GRAMMAR)
    head, slash, last = rest.rpartition("/")
    if scheme == "file":  # file:///PATH/NAME:TAG: the path is absolute
        if not head.startswith("/") or not last:
            raise UsageError(f"reference {text!r}: expected file:///PATH/NAME:TAG", hint=GRAMMAR)
    elif not slash or not head or not last:  # HOST or BUCKET, then at least NAME
        where = "HOST[:PORT]/REPO" if scheme == "oci" else "BUCKET/PREFIX"
        raise UsageError(f"reference {text!r}: expected {scheme}://{where}/NAME:TAG", hint=GRAMMAR)
    try:
        parse_ref(last)  # a clear error for a bad name, tag or digest
    except UsageError as e:
        raise UsageError(f"reference {text!r}: {e.message}", hint=f"{e.hint}; {GRAMMAR}" if e.hint else GRAMMAR) from None
    return f"{scheme}://{head}", last


def names_a_snapshot(url: str) -> bool:
    """Whether a registry URL ends in NAME:TAG or NAME@DIGEST (a full reference given
    where a registry was expected). A port (oci://HOST:PORT) is not a tag; nor, for
    file://, is a colon in a folder above the last one."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return False
    head, slash, last = rest.rpartition("/")
    return bool(slash and (head or scheme == "file")) and ("@" in last or ":" in last)


def locate(text: str, registry: str | None) -> tuple[str, str | None]:
    """A REF as commands take it: (NAME:TAG or NAME@DIGEST, registry URL or None for the
    default). A full reference carries its registry, so ``--registry`` must be absent."""
    full = split_full(text)
    if full is None:
        return text, registry
    if registry is not None:
        raise UsageError(f"{text!r} is a full reference, which names its registry: leave out --registry {registry}",
                         hint=GRAMMAR)
    return full[1], full[0]
