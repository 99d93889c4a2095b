"""A snapshot from a registry, checked before anything of it is used.

A snapshot is a recipe in disguise: its runtime section says which folders the runner
writes, what it mounts where, what it deletes (a stale ``file`` probe) and which trees
it writes out. The runner runs as root, so every one of those paths is checked here
with the rules the recipe loader applies (:func:`ready_file_problem`, mounts'
``check_destination``, plain names), and against this node (its run root). The
format itself (trees, chunks, names) is checked by store.snapshot.layout_problem.

What these checks cannot stop is what the snapshot runs: a host-process snapshot's
``argv`` is a command run as root. Only a trust policy (signing) decides whether a
snapshot is allowed to do that; see docs/registries.md, "Threat model".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import IntegrityError
from ..store.securefs import unsafe_name
from ..store.snapshot import layout_problem
from .mounts import check_destination
from .process import run_root

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")  # a recipe's name (recipe.load)
#: Where a ``file`` probe may point: the runner removes a stale one before a start.
READY_FILE_DIRS = ("/tmp/", "/var/tmp/", "/run/", "/dev/shm/")
ENGINES = ("host", "runc", "runsc")
ENGINE_OPTIONS = {"compression", "direct", "background", "nvproxy"}  # steps.checkpoint.RunscOptions


def ready_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a ``file`` readiness probe (None when it can). The runner
    deletes a stale ready file before each start, so it must be a scratch path."""
    if not path.startswith("/") or ".." in path.split("/") or "\0" in path:
        return f"ready file {path!r} must be an absolute path without '..'"
    if not path.startswith(READY_FILE_DIRS) or os.path.normpath(path) + "/" in READY_FILE_DIRS:
        return (f"ready file {path!r} must be below one of {', '.join(d.rstrip('/') for d in READY_FILE_DIRS)}: "
                "the runner removes a stale one before each start")
    return None


_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|_KEY$|^KEY$|API_?KEY", re.IGNORECASE)


def secret_names(env: dict) -> list[str]:
    """The names in ``env`` that look like secrets (``*TOKEN*``, ``*SECRET*``,
    ``*PASSWORD*``, ``*_KEY``, ``HF_TOKEN``...): a warm server's memory, and so its
    checkpoint, holds what it read from them."""
    return sorted(k for k in env if _SECRET.search(k))


def _is_digest(v: object) -> bool:
    return isinstance(v, str) and bool(_DIGEST.match(v))


def _str_map(v: object) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


def runtime_problem(runtime: object, node_run_root: Path | None = None) -> str | None:
    """What is wrong with a snapshot's runtime section (None: nothing)."""
    if not isinstance(runtime, dict):
        return "the runtime section is not an object"
    if runtime.get("engine") not in ENGINES:
        return f"runtime engine {runtime.get('engine')!r} is not one of {', '.join(ENGINES)}"
    if not _is_digest(runtime.get("artifact")):
        return "runtime artifact is not a digest"
    pids = runtime.get("pids", [])
    if not isinstance(pids, list) or not all(isinstance(p, int) and not isinstance(p, bool) and p > 1 for p in pids):
        return "runtime pids are not a list of process ids"
    items = runtime.get("after_restore") or []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        return "runtime after_restore is not a list of calls"
    spec = runtime.get("server")
    if not isinstance(spec, dict):
        return "runtime server is not an object"
    return _server_problem(spec, runtime["engine"], node_run_root or run_root())


def _server_problem(spec: dict, engine: str, node_root: Path) -> str | None:
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        return f"server name {name!r} is not a recipe name"
    argv = spec.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
        return "server argv is not a list of strings"
    if not _str_map(spec.get("env", {})) or not _str_map(spec.get("mounts", {})):
        return "server env and mounts must map strings to strings"
    cwd = spec.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or "\0" in cwd):
        return "server cwd is not a path"
    if spec.get("run_root") != str(node_root):
        return (f"server run root {spec.get('run_root')!r} is not this node's run root {str(node_root)!r} "
                "($SNAPBUILD_RUN_ROOT): the build machine and the node must agree")
    run_dir = spec.get("run_dir")
    if not isinstance(run_dir, str) or not re.fullmatch(re.escape(str(node_root / "run" / name)) + r"-[0-9a-f]{16}",
                                                        run_dir):
        return f"server run folder {run_dir!r} is not {node_root / 'run' / name}-<key> under the run root"
    inputs = spec.get("inputs", {})
    if not isinstance(inputs, dict):
        return "server inputs is not an object"
    for step, digest in inputs.items():
        why = unsafe_name(step)
        if why or not _is_digest(digest):
            return f"server input {step!r} is not a plain step name with a tree digest"
    for dest, step in spec.get("mounts", {}).items():
        why = check_destination(dest)
        if why:
            return why
        if step not in inputs:
            return f"mount {dest!r} names {step!r}, which is not one of the server's inputs"
    ready = spec.get("ready")
    if not isinstance(ready, dict):
        return "server ready probe is not an object"
    if "file" in ready:
        if engine != "host":
            return "a container's ready probe cannot be a file on the node"
        why = ready_file_problem(str(ready["file"]))
        if why:
            return why
    if engine != "host":
        if not _is_digest(spec.get("image")) or unsafe_name(spec.get("image_step")):
            return "a container server needs an image digest and a plain image step name"
        options = spec.get("engine_options") or {}
        if not isinstance(options, dict) or set(options) - ENGINE_OPTIONS:
            return f"engine options {sorted(set(options) - ENGINE_OPTIONS) if isinstance(options, dict) else options!r} are not known"
        if not isinstance(spec.get("image_config"), dict):
            return "a container server needs its image's config"
    return None


def check_snapshot(blobs, manifest: dict, where: str) -> dict:
    """The config of snapshot ``manifest`` (its config and tree blobs in ``blobs``) once
    its format and its runtime section pass; an IntegrityError (exit 5) naming
    ``where`` (the snapshot) and what is wrong otherwise."""
    from ..store.snapshot import load_config

    problem = layout_problem(blobs, manifest)
    config = None
    if problem is None:
        config = load_config(blobs, manifest)
        if config.get("runtime") is not None:
            problem = runtime_problem(config["runtime"])
    if problem:
        raise IntegrityError(f"snapshot {where}: {problem}; refusing it",
                             hint="the registry or cache holds a corrupt or hostile snapshot (or one built "
                                  "for another node layout); do not use it, and find out who pushed it")
    return config
