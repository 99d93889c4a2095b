"""``warmup``: a server started, probed ready and exercised, to be checkpointed.

```yaml
server:
  kind: warmup
  needs: [pydeps, app]                   # materialized under $SNAPBUILD_INPUTS/<step>/
  mounts: {/models/mlp: weights}         # and read-only at a fixed path (needs root)
  command: [python3, "$SNAPBUILD_INPUTS/app/serve.py", --port, "{{ port }}"]
  env: {PYTHONPATH: "$SNAPBUILD_INPUTS/pydeps/site"}
  env_from_node: [DATABASE_URL]          # value from the starting machine's environment
  ready: {http: "http://127.0.0.1:{{ port }}/healthz", timeout: 300}
  exercise:
    - {http: "POST /infer", body: '{"x": 1}', repeat: 3}
  io_uring: deny                         # the default (runtime.seccomp); `allow` opts out
```

Ephemeral: a live process cannot be cached. It runs only when the checkpoint that
consumes it must be built, and its key (spec and input keys) feeds that checkpoint's.
``$VARS`` in ``command``, ``env`` and ``cwd`` are expanded with the server's
environment (``$SNAPBUILD_INPUTS``, ``$SNAPBUILD_RUN``, ...).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import StepError
from ..store import default_home
from ..schema import ENV_NAME_RE, mount_point_problem, probe_problem, ready_file_problem, secret_names
from .base import StepSpec


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    http: str | None = None
    tcp: str | None = None
    log: str | None = None
    file: str | None = None
    timeout: float = Field(default=120, gt=0)
    interval: float = Field(default=0.05, gt=0)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("http", "tcp", "log", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a probe needs exactly one of http, tcp, log, file"
                             + (f" (got {', '.join(given)})" if given else ""))
        why = probe_problem(self.to_dict())  # as a node checks it: it travels in the snapshot
        if why:
            raise ValueError(why)
        return self

    def to_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


class Exercise(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    http: str | None = None  # "POST /infer" or "GET http://127.0.0.1:8000/x"
    run: str | None = None
    body: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    expect: int | None = None  # HTTP status (default 200), or exit status of `run` (default 0)
    repeat: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.http is None) == (self.run is None):
            raise ValueError("an exercise needs exactly one of http, run")
        return self


class WarmupSpec(StepSpec):
    command: list[str] | None = None
    run: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    # Names only: each value comes from the environment of the machine that starts the
    # server (the build's for the warm-up, the node's for a restore or cold boot), and
    # is never written into the snapshot (docs/recipes.md, "Secrets").
    env_from_node: list[str] = Field(default_factory=list)
    cwd: str | None = None
    ready: Probe
    exercise: list[Exercise] = Field(default_factory=list)
    # Containers (checkpoint engine runc/runsc): the image step to run in.
    image: str | None = None
    # Input steps shown read-only at fixed paths (besides $SNAPBUILD_INPUTS/<step>): paths
    # of the container, or for a host process bind mounts of the machine (needs root).
    mounts: dict[str, str] = Field(default_factory=dict)
    # The server and its children start with io_uring denied (EPERM, as Docker's default
    # seccomp profile does): CRIU cannot checkpoint an io_uring, and libuv (uvloop) falls
    # back to epoll. `allow` opts out; the checkpoint step still refuses a tree holding one.
    io_uring: Literal["deny", "allow"] = "deny"

    # Everything here is in the key, the probe's timeout too: the probe travels in the
    # snapshot (the runner's cold boot uses it), so it is part of the output.
    KEYLESS: ClassVar[frozenset[str]] = StepSpec.KEYLESS

    def key_fields(self) -> dict:
        out = super().key_fields()
        for name, default in (("env_from_node", []), ("io_uring", "deny")):
            if out[name] == default:  # the keys of warm-ups from before the field existed
                del out[name]
        return out

    @model_validator(mode="after")
    def _command_or_run(self):
        if (self.command is None) == (self.run is None):
            raise ValueError("give exactly one of `command:` (a list) or `run:` (a shell line)")
        if self.command is not None and not self.command:
            raise ValueError("`command:` is empty")
        if self.image and self.ready.file is not None:
            raise ValueError("a `file` probe checks a path on this machine, not in the container: "
                             "use an http, tcp or log probe")
        for name in self.env_from_node:
            if not ENV_NAME_RE.match(name) or name.startswith("SNAPBUILD_"):
                raise ValueError(f"env_from_node: {name!r} is not a variable name (SNAPBUILD_* are snapbuild's)")
            if name in self.env:
                raise ValueError(f"env_from_node: {name} is in `env:` too; give it in one of them")
        if len(set(self.env_from_node)) != len(self.env_from_node):
            raise ValueError("env_from_node: a name is given twice")
        for dest in self.mounts:
            why = mount_point_problem(dest, (str(default_home()),))
            if why:
                raise ValueError(why)
        if self.ready.file is not None:
            why = ready_file_problem(self.ready.file)
            if why:
                raise ValueError(why)
        return self

    def secret_env(self) -> list[str]:
        """Where ``env``, ``command`` or ``run`` look like they hold secrets (names, and
        ``command[i]`` or ``run[0]``, never values; see :func:`schema.secret_names`):
        they are written into the snapshot, and the checkpoint holds the server's memory,
        so whatever it read from them. ``env_from_node`` names hold no value here."""
        argv, label = (self.command, "command") if self.command is not None else ([self.run or ""], "run")
        return secret_names(self.env, argv, label)

    def argv(self) -> list[str]:
        return list(self.command) if self.command is not None else ["bash", "-c", self.run]


class WarmupStep:
    name = "warmup"
    version = 1
    Spec = WarmupSpec
    ephemeral = True

    def references(self, spec):
        refs = [(spec.image, ("image",))] if spec.image else []
        return refs + [(name, ("mounts", dest)) for dest, name in spec.mounts.items()]

    def check_links(self, spec, steps: dict):
        """A mount shows a folder: the output of a files, command or weights step."""
        for dest, name in spec.mounts.items():
            kind = steps[name].kind
            if kind.ephemeral or kind.name in ("image", "checkpoint"):
                return (("mounts", dest), f"`{name}` (kind: {kind.name}) is not a folder: only the output of a "
                        "files, command or weights step can be mounted", "mount a step whose output is a file tree")
        return None

    def pins(self, spec, ctx):
        return {}

    def build(self, spec, ctx):  # pragma: no cover - the executor never builds ephemeral steps
        raise StepError("a warmup step runs only inside the checkpoint that consumes it")
