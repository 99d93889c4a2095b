"""The protocol every step kind implements, and the spec base class.

A kind is a small object registered by name (see :mod:`snapbuild.steps`). The planner
asks it for the step's references (edges of the DAG) and its *pins* (the immutable
identity of anything outside the recipe that the step reads: file contents, image
digests, model commits); the executor asks it to build. Everything that goes into a
step's cache key is therefore visible in one place: the kind's version, the spec, the
pins and the keys of its inputs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field

from ..store import Store

STEP_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StepSpec(BaseModel):
    """Keys every step accepts. Kinds subclass this with their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    needs: list[str] = Field(default_factory=list)
    description: str | None = None

    # Keys that never reach the cache key: `needs` is there as input keys instead,
    # a description changes no output.
    KEYLESS: ClassVar[frozenset[str]] = frozenset({"kind", "needs", "description"})

    def key_fields(self) -> dict:
        return self.model_dump(mode="json", exclude=set(self.KEYLESS))


@dataclass
class PinContext:
    """What a kind may look at when resolving pins."""

    base_dir: Path  # the recipe's directory; relative paths in specs start here
    store: Store
    #: ``--offline``: kinds with floating references take them from ``locked`` (the lock
    #: file's entry for this step, see :mod:`snapbuild.lock`) instead of asking the source
    offline: bool = False
    step: str = ""
    locked: dict | None = None
    lock_file: str = "RECIPE.lock"

    def locked_pins(self, source: str) -> dict:
        """What the lock file resolved ``source`` to, for an offline plan; an error
        that names the step and the pin when the lock file has none."""
        from ..errors import MissingPin

        entry = self.locked
        if entry is None:
            raise MissingPin(f"step {self.step!r}: {source} has no pin in {self.lock_file}, and an offline build "
                             "takes floating references only from the lock file",
                             hint="build (or `snapbuild lock --update RECIPE`) once where the source can be "
                                  "reached, or build without --offline (and without HF_HUB_OFFLINE=1)")
        if entry.get("source") != source:
            raise MissingPin(f"step {self.step!r}: {self.lock_file} pins {entry.get('source')}, the recipe now "
                             f"says {source}; an offline build cannot resolve the new reference",
                             hint="refresh the lock file where the source can be reached: "
                                  "snapbuild lock --update RECIPE")
        return entry["resolved"]


@dataclass
class BuildContext:
    """What a kind gets when it builds one step."""

    name: str
    key: str
    store: Store
    base_dir: Path
    log: IO[str]
    log_path: Path
    inputs: dict[str, str] = field(default_factory=dict)  # step name -> artifact digest
    pins: dict = field(default_factory=dict)
    recipe: object = None  # the Recipe, for kinds that read other steps' specs
    artifacts: dict[str, str | None] = field(default_factory=dict)  # every finished step's artifact
    input_keys: dict[str, str] = field(default_factory=dict)  # step name -> key, for this step's inputs
    #: Set when the build is interrupted: long-running kinds poll it and stop early.
    cancel: threading.Event = field(default_factory=threading.Event)
    offline: bool = False  # reach no network source: only the store and local caches

    def materialize_input(self, name: str, dest: Path) -> None:
        from ..store.tree import load_tree, materialize

        materialize(self.store.blobs, load_tree(self.store.blobs, self.inputs[name]), dest)


class StepKind(Protocol):
    """What a step kind provides. See :mod:`snapbuild.steps.files` for a small example."""

    name: ClassVar[str]
    #: Bump when the meaning of the spec or the artifact layout changes: it is part of
    #: every key of this kind, so old cache entries stop matching.
    version: ClassVar[int]
    Spec: ClassVar[type[StepSpec]]
    #: Ephemeral steps (a live process) are never cached on their own.
    ephemeral: ClassVar[bool]

    def references(self, spec: StepSpec) -> list[tuple[str, tuple]]:
        """Other steps this spec refers to beyond ``needs``: (step name, key path)."""

    def pins(self, spec: StepSpec, ctx: PinContext) -> dict:
        """Immutable identities of the outside things the step reads (JSON-able)."""

    def build(self, spec: StepSpec, ctx: BuildContext) -> str:
        """Do the work and return the digest of the artifact tree in ``ctx.store``."""
