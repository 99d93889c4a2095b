"""The loaded recipe: what the planner works from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from ..steps import StepKind, StepSpec
from .yamlloc import Located


@dataclass
class Step:
    name: str
    kind: StepKind
    spec: StepSpec
    deps: list[str]  # every step this one reads from (needs + kind references), sorted


@dataclass
class Recipe:
    """One build: a recipe file with one combination of its matrix (if any)."""

    name: str
    path: Path
    steps: dict[str, Step]
    graph: nx.DiGraph
    vars: dict
    variant: dict = field(default_factory=dict)  # matrix values of this build
    tag: str | None = None
    publish_steps: list[str] = field(default_factory=list)
    source: Located | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def build_id(self) -> str:
        """Names this build in the store's state (one per matrix combination)."""
        if not self.variant:
            return self.name
        return self.name + "[" + ",".join(f"{k}={v}" for k, v in self.variant.items()) + "]"

    def order(self) -> list[str]:
        """Steps in a stable topological order (ties broken by name)."""
        return list(nx.lexicographical_topological_sort(self.graph))
