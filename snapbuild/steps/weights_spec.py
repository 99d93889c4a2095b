"""What a ``weights`` step says (:class:`WeightsSpec`): its source and which of its files.

Its own module because both sides read it: the step kind (:mod:`.weights`) and the
sources that resolve and fetch it (:mod:`.weight_sources`), which the step kind uses.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import Field, field_validator

from .base import StepSpec

SCHEMES = ("hf://", "s3://", "file://")


class WeightsSpec(StepSpec):
    source: str
    include: list[str] = Field(default_factory=list)  # fnmatch patterns on paths relative to the source
    exclude: list[str] = Field(default_factory=list)
    repo_type: Literal["model", "dataset", "space"] = "model"  # hf://
    endpoint: str | None = None  # hf://: another Hub (default $HF_ENDPOINT, else huggingface.co)
    endpoint_url: str | None = None  # s3://: an S3-compatible server
    region: str | None = None  # s3://

    @field_validator("source")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(SCHEMES):
            raise ValueError(f"source {v!r} must start with one of {', '.join(SCHEMES)}")
        return v

    def key_fields(self) -> dict:
        """A local folder counts by its content (pinned), not by where it is."""
        out = super().key_fields()
        if self.source.startswith("file://"):
            out["source"] = "file://"
        return out

    def selected(self, rel: str) -> bool:
        inc = not self.include or any(fnmatch.fnmatch(rel, p) for p in self.include)
        return inc and not any(fnmatch.fnmatch(rel, p) for p in self.exclude)


__all__ = ["SCHEMES", "WeightsSpec"]
