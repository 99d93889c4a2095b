"""One way to start a server, shared by the warm-up (build side) and the cold boot
(runner), so that both see exactly the same command, environment and paths.

A *server spec* is a :class:`snapbuild.schema.ServerSpec`, stored in the snapshot as
part of checkpoint.json::

    {"argv": [...], "env": {...}, "cwd": "$SNAPBUILD_RUN" | null, "ready": {probe},
     "run_dir": "/var/lib/snapbuild/run/<id>", "inputs": {"app": "sha256:..."},
     "mounts": {"/models/minilm": "model"}}

``mounts`` shows input trees read-only at fixed paths: for a host process
they are bind mounts of this machine (:mod:`.mounts`), made before the server starts
or is restored; for containers, mounts of the container.

Every start goes through :func:`.seccomp.wrap`: the server (and, in namespaces of its
own, its launcher) runs with io_uring denied unless ``io_uring`` is "allow".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NodeError, SnapbuildError, UsageError
from ..schema import ServerSpec
from ..store.blobs import BlobStore
from ..tools import OrphanGuard
from . import mounts
from . import probe as probes
from . import process, seccomp
from .layout import INPUTS_NAME, LOG_NAME
from .trees import ensure_inputs, link_inputs


@dataclass
class Started:
    proc: subprocess.Popen
    log_path: Path
    env: dict
    log_offset: int = 0  # where this run's output starts in the log
    mounted: list[Path] = field(default_factory=list)  # mounts made for this start: unmount() them
    #: isolation "namespaces": the server's PID here (PID 1 of its namespace; ``proc`` is
    #: the launcher that waits for it) and the host port forwarded into its network
    root: int | None = None
    host_port: int | None = None

    @property
    def isolated(self) -> bool:
        return self.root is not None

    @property
    def pid(self) -> int:
        return self.root if self.root is not None else self.proc.pid

    def probe(self, ready: dict) -> dict:
        """``ready`` as this machine asks it: through the forwarder when isolated."""
        return probes.pointed_at(ready, self.host_port) if self.isolated else ready

    def wait_ready(self, probe: dict, timeout: float | None = None) -> float:
        return probes.wait_ready(probe, log_path=self.log_path, log_offset=self.log_offset,
                                 alive=lambda: self.proc.poll() is None, timeout=timeout)

    @property
    def shell(self):
        """How an exercise's ``run:`` line runs: inside the server's network when isolated
        (so 127.0.0.1:PORT is the server), else None (the default, here)."""
        if not self.isolated:
            return None
        netns = f"--net=/proc/{self.root}/ns/net"
        from ..tools import run_killing_group

        return lambda line, t: run_killing_group(["nsenter", netns, "bash", "-c", line], timeout=t, env=self.env)

    def wait_exit(self, timeout: float) -> None:
        self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        process.stop(self.pid)
        if self.isolated:  # the launcher goes with its server; make sure
            process.stop(self.proc.pid)


def prepare(spec: ServerSpec, blobs: BlobStore) -> tuple[Path, dict, list[Path]]:
    """Materialize the inputs (once per machine), link them under the run folder and
    mount those that ``mounts`` names. Returns the run folder, the server's environment
    and the mount points mounted now (those already in place are not theirs to undo)."""
    from_node = node_env(spec)  # first: a node without them starts nothing
    run_dir = Path(spec.run_dir)
    root = Path(spec.run_root)
    paths = ensure_inputs(blobs, spec.inputs, root, spec.tree_images.trees if spec.tree_images else None)
    link_inputs(paths, run_dir / INPUTS_NAME)
    mounted: list[Path] = []
    try:
        for dest, name in sorted(spec.mounts.items() if spec.image is None else ()):
            if mounts.bind_ro(paths[name], Path(dest)):
                mounted.append(Path(dest))
    except SnapbuildError:
        unmount(mounted)
        raise
    (run_dir / "home").mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(run_dir / "home"),
        "LANG": "C.UTF-8",
        "SNAPBUILD_RUN": str(run_dir),
        "SNAPBUILD_INPUTS": str(run_dir / INPUTS_NAME),
    }
    base = dict(env)
    for k, v in spec.env.items():  # from the variables above: independent of order
        env[k] = _expand(v, base)
    env.update(from_node)
    return run_dir, env, mounted


def node_env(spec: ServerSpec) -> dict[str, str]:
    """The values of the spec's ``env_from_node`` names, from this process's environment
    (the build's for a warm-up, the runner's for a restore or cold boot): they reach the
    server's environment and a restore's ``after_restore`` run lines, never the snapshot.
    A restored server keeps what it read at its warm-up: its memory is the checkpoint's."""
    missing = [n for n in spec.env_from_node if n not in os.environ]
    if missing:
        raise NodeError(f"server {spec.name} takes {', '.join(missing)} from the environment of the machine that "
                        "starts it, and this one has no such variable",
                        hint="set it in the environment of snapbuild-runner (or of `snapbuild build`, for the "
                             "warm-up); its value never goes into the snapshot")
    return {n: os.environ[n] for n in spec.env_from_node}


def unmount(points: list[Path]) -> None:
    for p in reversed(points):
        mounts.unmount(p)


def check_port_free(spec: ServerSpec) -> None:
    """Refuse to start a server whose port is taken: its probe would talk to the other one."""
    addr = probes.address(spec.ready)
    if addr is not None and probes.port_in_use(addr):
        raise UsageError(f"port {addr[1]} on {addr[0]} is already taken: another server is listening there",
                         hint="stop it first (snapbuild-runner stop PID, if the runner started it), "
                              "or give this server another port")


def server_port(spec: ServerSpec) -> int:
    """The port the server listens on, from its probe (which names one for a server in
    namespaces of its own: the schema and the recipe checks see to it)."""
    addr = probes.address(spec.ready)
    if addr is None:
        raise UsageError(f"server {spec.name}: its ready probe names no port to publish")
    return addr[1]


def start(spec: ServerSpec, blobs: BlobStore, *, fresh_log: bool = True, host_port: int | None = None,
          guard: OrphanGuard | None = None) -> Started:
    """Start the server as the spec says. The port must be free; a stale ready file is
    removed first. ``fresh_log`` starts an empty log, else this run's output is appended.
    A server in namespaces of its own (``isolation``) is reached on ``host_port`` of
    this machine (0: a free one; None: its own port number). ``guard`` is told each of
    its processes that leads a group, as soon as it exists (a build's warm-up server dies
    with the build)."""
    isolated = spec.isolation == "namespaces"
    listener = None
    if isolated:
        from .portfwd import listen

        listener = listen(server_port(spec) if host_port is None else host_port)
    else:
        check_port_free(spec)
    try:
        return _start(spec, blobs, fresh_log, listener, guard)
    finally:
        if listener is not None:
            listener.close()


def _start(spec: ServerSpec, blobs: BlobStore, fresh_log: bool, listener, guard: OrphanGuard | None) -> Started:
    run_dir, env, mounted = prepare(spec, blobs)
    argv = [_expand(a, env) for a in spec.argv]
    cwd = Path(_expand(spec.cwd, env)) if spec.cwd else run_dir
    _check_command(argv[0], env, cwd, mounted)
    if listener is not None:
        argv = [sys.executable, "-m", "snapbuild.runtime.nsinit", "--", *argv]
    try:  # outermost: the launcher in namespaces and the server inherit the filter
        argv = seccomp.wrap(argv, spec.io_uring)
    except SnapbuildError:
        unmount(mounted)
        raise
    log_path = run_dir / LOG_NAME
    if fresh_log:
        log_path.unlink(missing_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    probes.clear_stale(spec.ready)
    try:
        proc = process.start(argv, env=env, cwd=cwd, log_path=log_path)
    except OSError as e:
        unmount(mounted)
        raise FileNotFoundError(f"cannot start {argv[0]!r}: {e.strerror}") from None
    if guard is not None:
        guard.add(proc.pid)
    started = Started(proc=proc, log_path=log_path, env=env, log_offset=offset, mounted=mounted)
    if listener is not None:
        from .portfwd import spawn

        try:
            started.root = process.first_child(proc.pid, alive=lambda: proc.poll() is None)
            if guard is not None:
                guard.add(started.root)  # PID 1 of the namespace: nsinit's death does not end it
        except SnapbuildError as e:
            process.stop(proc.pid)
            unmount(mounted)
            raise SnapbuildError(f"{e.message}\n{process.tail(log_path, 5)}".rstrip()) from None
        _, started.host_port = spawn(listener, f"/proc/{started.root}/ns/net", server_port(spec), watch=started.root)
    return started


def _check_command(command: str, env: dict, cwd: Path, mounted: list[Path]) -> None:
    """Refuse a command that is not there now, before a launcher that would only find
    out later (in the server's log) is started."""
    found = shutil.which(command, path=env.get("PATH")) if "/" not in command else \
        (command if os.access(cwd / command, os.X_OK) else None)
    if found is None:
        unmount(mounted)
        raise FileNotFoundError(f"cannot start {command!r}: no such executable file"
                                + ("" if "/" in command else " on the server's PATH"))


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand(value: str, env: dict) -> str:
    """``$NAME`` / ``${NAME}`` from the server's environment (not the caller's); unknown
    names are left as written, like the shell's ``expandvars``."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), value)
