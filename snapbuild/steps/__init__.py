"""Step kinds, registered by name and imported only when a recipe uses them."""

from __future__ import annotations

import importlib

from .base import BuildContext, PinContext, StepKind, StepSpec

_KINDS: dict[str, str] = {
    "files": "snapbuild.steps.files:FilesStep",
    "command": "snapbuild.steps.command:CommandStep",
    "warmup": "snapbuild.steps.warmup:WarmupStep",
    "checkpoint": "snapbuild.steps.checkpoint:CheckpointStep",
    "image": "snapbuild.steps.image:ImageStep",
    "weights": "snapbuild.steps.weights:WeightsStep",
}
_loaded: dict[str, StepKind] = {}


def register(name: str, target: str) -> None:
    """Register a kind as ``"module:Class"``; it is imported on first use."""
    _KINDS[name] = target
    _loaded.pop(name, None)


def kind_names() -> list[str]:
    return sorted(_KINDS)


def get_kind(name: str) -> StepKind:
    """The kind registered under ``name``; ``KeyError`` when there is none."""
    if name not in _loaded:
        module, _, cls = _KINDS[name].partition(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]


__all__ = ["BuildContext", "PinContext", "StepKind", "StepSpec", "get_kind", "kind_names", "register"]
