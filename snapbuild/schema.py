"""What crosses from the build to the node, typed: the snapshot config, its runtime
section (``checkpoint.json``), the server spec and the tree-image index.

The build writes these with ``to_json``; a node reads them with ``from_json``, which
checks every field and names the one that is wrong (``runtime.server.mounts['/etc']:
...``). A snapshot comes from a registry: it is a recipe in disguise, so the paths in
it are held to the rules the recipe loader applies (:func:`mount_point_problem`,
:func:`ready_file_problem`, plain names) and to this node (its run root). A section
of a newer format than this snapbuild reads is refused with "upgrade snapbuild".

The runtime section stays in its box: mount points stay out of system folders, the
run root and the store; probes and HTTP calls (``ready``, ``after_restore``,
``verify``) go to the restored server only; a container's ``after_restore`` run lines
run inside it (runner.restore). What these checks cannot stop is what a host-process
snapshot runs: its ``argv`` (and its run lines) are commands run as root. Only a trust
policy decides whether a snapshot may do that (docs/registries.md, "Threat model").

Standard library only (plus the store's path rules and the node layout): this is
imported on nodes, and by nothing it imports.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import IntegrityError, UsageError
from .runtime.layout import RUN_OWN, run_root, runner_owned
from .runtime.sockdirs import SCRATCH, place
from .store.securefs import unsafe_name, unsafe_relpath

#: The snapshot config's ``format``, and the newest runtime section (checkpoint.json)
#: this snapbuild reads: 2 adds ``shm_files`` (written only by checkpoints that have some).
CONFIG_FORMAT = 1
RUNTIME_FORMAT = 5  # 3: a host process in namespaces of its own (server.isolation); 4: server.env_from_node;
#                     5: run_files (the files a host or runc tree held in its run folder, put back on restore)
ISOLATIONS = ("host", "namespaces")
#: ``server.io_uring``: whether the server may use io_uring (runtime.seccomp). Absent means
#: "deny", and a runner that predates the field denies nothing: no format needed (a
#: cold boot is never checkpointed, and a restore keeps the filter the dump carried).
IO_URING = ("deny", "allow")

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")  # a recipe's name
ENGINES = ("host", "runc", "runsc")
CONTAINER_ENGINES = ("runc", "runsc")
ENGINE_OPTIONS = ("compression", "direct", "background", "nvproxy")  # steps.checkpoint.RunscOptions
#: Where a ``file`` probe may point: the runner removes a stale one before each start.
READY_FILE_DIRS = ("/tmp/", "/var/tmp/", "/run/", "/dev/shm/")
#: Mount points that would cover the system (and everything below /proc, /sys, /dev).
SYSTEM_PATHS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin",
                          "/sys", "/tmp", "/usr", "/var"})
#: Folders no mount point may be below (nor may /lib*), unless $SNAPBUILD_ALLOW_MOUNT_ROOTS
#: allows a root there: a host process's mounts are the node's, made by root.
SYSTEM_DIRS = ("/etc", "/usr", "/bin", "/sbin", "/boot", "/root", "/var/lib", "/var/run", "/run", "/proc", "/sys",
               "/dev")
ALLOW_MOUNT_ROOTS = "SNAPBUILD_ALLOW_MOUNT_ROOTS"
#: The names of this machine an http or tcp probe may use: the runner asks them.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
#: Words of a variable's name that say it holds a secret (``HF_TOKEN``, ``DB_PASSWORD``,
#: ``apiKey``; not ``TOKENIZERS_PARALLELISM``), and endings of a word (``PGPASSWORD``).
SECRET_WORDS = frozenset({"TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASSPHRASE",
                          "CREDENTIAL", "CREDENTIALS", "KEY", "KEYS", "APIKEY"})
SECRET_ENDINGS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "APIKEY")
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
#: What secrets look like, whatever the variable or argument holding them is called.
SECRET_VALUES = (
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{20,}")),
    ("an AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")),
    ("a GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,})")),
    ("a Slack token", re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}")),
    ("a private key", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----")),
    ("a password in a URL", re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")),
)
#: A variable name (``env_from_node``).
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SchemaError(IntegrityError):
    """A snapshot's config or runtime section that this node must not use (exit 5)."""


# --- the rules, shared with the recipe loader ---------------------------------------------

def mount_point_problem(dest: str, roots: tuple[str, ...] = ()) -> str | None:
    """Why ``dest`` cannot be a mount point (None when it can): not on a system path,
    nor below a system folder (:data:`SYSTEM_DIRS`, ``/lib*``) unless
    :func:`allowed_mount_roots` allows a root above it, nor below or above this
    machine's run root or the other ``roots`` (a snapshot's run root, the store:
    runtime.mounts adds it, as this module cannot import the store)."""
    if not dest.startswith("/") or ".." in dest.split("/") or "\0" in dest:
        return f"mount point {dest!r} must be an absolute path without '..'"
    norm = os.path.normpath(dest)
    if norm in SYSTEM_PATHS or norm.startswith(("/proc/", "/sys/", "/dev/")):
        return f"mount point {dest!r} would cover a system path"
    for root in (str(run_root()), *roots):
        root = os.path.normpath(root)
        if _below(norm, root) or _below(root, norm):
            return f"mount point {dest!r} would cover or be inside {root}, where snapbuild keeps its files"
    if any(_below(norm, r) for r in allowed_mount_roots()):
        return None
    top = "/" + norm.split("/")[1]
    folder = next((f for f in SYSTEM_DIRS if _below(norm, f)), top if top.startswith("/lib") else None)
    if folder is not None:
        return (f"mount point {dest!r} is below the system folder {folder}; a machine that allows it names a "
                f"root above it in ${ALLOW_MOUNT_ROOTS} (colon-separated)")
    return None


def _below(path: str, folder: str) -> bool:
    """Whether normalized ``path`` is ``folder`` or below it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def allowed_mount_roots() -> tuple[str, ...]:
    """``$SNAPBUILD_ALLOW_MOUNT_ROOTS``: absolute folders, colon-separated, below which
    this machine allows mount points in system folders (``/usr/local/models``). The
    node setting ``allow_mount_roots`` (snapbuild.settings): the file or the variable."""
    from . import settings

    roots = list(settings.get("allow_mount_roots"))
    bad = [r for r in roots if not r.startswith("/") or ".." in r.split("/") or os.path.normpath(r) == "/"]
    if bad:
        raise UsageError(f"${ALLOW_MOUNT_ROOTS}: {bad[0]!r} is not an absolute folder below /",
                         hint=f"set {ALLOW_MOUNT_ROOTS} to folders such as /usr/local/models, colon-separated")
    return tuple(os.path.normpath(r) for r in roots)


def on_the_server(http: str) -> bool:
    """Whether an HTTP exercise item (``"POST /infer"``, ``"/healthz"``) names a path on
    the server's own address rather than a URL: what a check request must be."""
    return http.strip().rpartition(" ")[2].startswith("/")


def probe_address(ready: dict) -> tuple[str, int] | None:
    """The (host, port) an http or tcp probe asks, checked (None for a log or file
    probe); raises ValueError with why for one that is malformed."""
    if "http" in ready:
        u = urlsplit(str(ready["http"]))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{ready['http']!r} is not an http(s) URL")
        return u.hostname, u.port or (443 if u.scheme == "https" else 80)  # .port raises ValueError
    if "tcp" in ready:
        host, _, port = str(ready["tcp"]).rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{ready['tcp']!r} is not HOST:PORT")
        return host.strip("[]") or "127.0.0.1", int(port)
    return None


def probe_problem(ready: dict) -> str | None:
    """Why ``ready`` cannot be a server's readiness probe (None when it can): one kind,
    a string, and an http or tcp probe asks this machine (the restored server) only."""
    kinds = [k for k in ("http", "tcp", "log", "file") if k in ready]
    if len(kinds) != 1 or not isinstance(ready[kinds[0]], str):
        return "needs exactly one of http, tcp, log, file, a string"
    try:
        addr = probe_address(ready)
    except ValueError as e:
        return str(e)
    if addr is not None and addr[0] not in LOOPBACK:
        return (f"{ready[kinds[0]]!r} asks {addr[0]}, not this machine: a probe goes to the server itself "
                f"({', '.join(sorted(LOOPBACK))})")
    return None


def server_request_problem(http: str, ready: dict) -> str | None:
    """Why the HTTP item ``http`` (after_restore, verify) is not a request to the server
    that ``ready`` probes (None when it is): a path, asked on the server's address, or
    a URL of that very address (loopback and the probe's port)."""
    target = http.strip().rpartition(" ")[2]
    try:
        addr = probe_address(ready)
    except ValueError:
        addr = None
    if addr is None:
        return f"{http!r} needs the server's address, but its ready probe (a log or file probe) names none"
    if target.startswith("/"):
        return None
    try:
        u = urlsplit(target)
        same = u.scheme in ("http", "https") and u.hostname in LOOPBACK and u.port == addr[1]
    except ValueError:
        same = False
    return None if same else (f"{target!r} is not the restored server: give a path (`POST /wake_up`), which the "
                              "runner asks on the server's own address")


def ready_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a ``file`` readiness probe (None when it can): the runner
    deletes a stale ready file before each start, so it must be a scratch path."""
    if not path.startswith("/") or ".." in path.split("/") or "\0" in path:
        return f"ready file {path!r} must be an absolute path without '..'"
    if not path.startswith(READY_FILE_DIRS) or os.path.normpath(path) + "/" in READY_FILE_DIRS:
        return (f"ready file {path!r} must be below one of {', '.join(d.rstrip('/') for d in READY_FILE_DIRS)}: "
                "the runner removes a stale one before each start")
    return None


def secret_name(name: str) -> bool:
    """Whether a variable's name says it holds a secret: a word of it (split at ``_``,
    other signs and camelCase) is one of :data:`SECRET_WORDS`, or ends in one of
    :data:`SECRET_ENDINGS` (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``PGPASSWORD``)."""
    words = [w.upper() for part in re.split(r"[^A-Za-z0-9]+", name) for w in _WORD.findall(part)]
    return any(w in SECRET_WORDS or w.endswith(SECRET_ENDINGS) for w in words)


def secret_value(text: str) -> str | None:
    """What secret ``text`` looks like it holds (``"a GitHub token"``), None when none:
    the kind only, never the text."""
    return next((kind for kind, pattern in SECRET_VALUES if pattern.search(text)), None)


def secret_names(env: dict, argv: list[str] | None = None, label: str = "command") -> list[str]:
    """Where ``env`` and ``argv`` look like they hold secrets, by name or by value:
    ``NAME`` (its name says so), ``NAME (a GitHub token)``, ``command[2] (a password
    in a URL)`` (``label`` and the argument's index). Never a value: this is printed.
    A warm server's memory, and so its checkpoint, holds what it read from them."""
    out = []
    for name, value in sorted(env.items()):
        if secret_name(name):
            out.append(name)
        elif kind := secret_value(str(value)):
            out.append(f"{name} ({kind})")
    for i, arg in enumerate(argv or []):
        kind = secret_value(arg)
        if kind:
            out.append(f"{label}[{i}] ({kind})")
    return out


# --- reading checked JSON -----------------------------------------------------------------

class _Doc:
    """A JSON object being read, with the path of keys to it, for error messages."""

    def __init__(self, doc: object, where: str) -> None:
        if not isinstance(doc, dict):
            raise SchemaError(f"{where} is not an object")
        self.doc, self.where = doc, where

    def fail(self, key: str, why: str) -> SchemaError:
        return SchemaError(f"{self.where}.{key}: {why}")

    def has(self, key: str) -> bool:
        return self.doc.get(key) is not None

    def text(self, key: str, *, optional: bool = False, pattern: re.Pattern | None = None) -> Any:
        v = self.doc.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str) or "\0" in v:
            raise self.fail(key, "is not a string")
        if pattern is not None and not pattern.match(v):
            raise self.fail(key, f"{v!r} does not match {pattern.pattern}")
        return v

    def digest(self, key: str, *, optional: bool = False) -> Any:
        return self.text(key, optional=optional, pattern=DIGEST_RE)

    def integer(self, key: str, default: int | None = None) -> int:
        v = self.doc.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(key, "is not an integer")
        return v

    def mapping(self, key: str, *, optional: bool = False) -> Any:
        v = self.doc.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, dict):
            raise self.fail(key, "is not an object")
        return v

    def strings(self, key: str) -> dict[str, str]:
        v = self.doc.get(key) or {}
        if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) and "\0" not in x
                                               for k, x in v.items()):
            raise self.fail(key, "does not map strings to strings")
        return dict(v)

    def items(self, key: str, item: type) -> list:
        v = self.doc.get(key) or []
        if not isinstance(v, list) or not all(isinstance(x, item) and not isinstance(x, bool) for x in v):
            raise self.fail(key, f"is not a list of {item.__name__}")
        return list(v)

    def version(self, key: str, supported: int, what: str) -> int:
        v = self.integer(key)
        if v > supported:
            raise SchemaError(f"{self.where}: {what} format {v} is newer than this snapbuild reads ({supported})",
                              hint="upgrade snapbuild on this machine to the version that built the snapshot")
        if v < 1:
            raise self.fail(key, f"{what} format {v} does not exist")
        return v


def _digest_map(d: _Doc, key: str, names: bool = False) -> dict[str, str]:
    m = d.strings(key)
    for k, v in m.items():
        if (unsafe_name(k) if names else not DIGEST_RE.match(k)) or not DIGEST_RE.match(v):
            raise d.fail(f"{key}[{k!r}]", "must map a " + ("plain step name" if names else "digest") + " to a digest")
    return m


# --- the types -------------------------------------------------------------------------

@dataclass(frozen=True)
class TreeImages:
    """``tree_images``: input tree (or layer) digest -> the digest of its EROFS image tree."""

    format: str = "erofs"
    trees: dict[str, str] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: object, where: str = "tree_images") -> TreeImages:
        d = _Doc(doc, where)
        if d.text("format") != "erofs":
            raise d.fail("format", f"{d.doc['format']!r} is not erofs")
        return cls(format="erofs", trees=_digest_map(d, "trees"), layers=_digest_map(d, "layers"))

    def to_json(self) -> dict:
        return asdict(self)

    def images(self) -> list[str]:
        return [*self.trees.values(), *self.layers.values()]


@dataclass(frozen=True)
class ServerSpec:
    """How to start the server, for a restore and a cold boot alike (``runtime.server``)."""

    name: str
    argv: list[str]
    ready: dict[str, Any]
    run_root: str
    run_dir: str
    env: dict[str, str] = field(default_factory=dict)
    #: names whose values the server takes from the environment of the machine that
    #: starts it (the build's for the warm-up, the node's for a restore or cold boot):
    #: never written into a snapshot (runtime.server.node_env)
    env_from_node: list[str] = field(default_factory=list)
    cwd: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, str] = field(default_factory=dict)
    #: a host process's: "host" (the machine's PIDs and network), or "namespaces" (its
    #: own PID, network and IPC namespaces: replicas side by side, see runtime.nsinit)
    isolation: str = "host"
    #: "deny" (io_uring answered EPERM by a seccomp filter, as Docker does) or "allow" (the
    #: warm-up's ``io_uring: allow``): for the warm-up and every cold boot (runtime.seccomp)
    io_uring: str = "deny"
    # a container's
    image: str | None = None
    image_step: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    image_config: dict[str, Any] | None = None
    #: Not stored: the snapshot's tree images, set by a runner that mounts them.
    tree_images: TreeImages | None = None

    @classmethod
    def from_json(cls, doc: object, where: str, engine: str, node_root: Path | None = None) -> ServerSpec:
        d = _Doc(doc, where)
        name = d.text("name", pattern=NAME_RE)
        argv = d.items("argv", str)
        if not argv or any("\0" in a for a in argv):
            raise d.fail("argv", "is not a non-empty list of strings")
        run_root, run_dir = d.text("run_root"), d.text("run_dir")
        if node_root is not None and run_root != str(node_root):
            raise SchemaError(f"{where}.run_root: {run_root!r} is not this node's run root {str(node_root)!r} "
                              "($SNAPBUILD_RUN_ROOT): the build machine and the node must agree",
                              hint=f"set SNAPBUILD_RUN_ROOT={run_root} on this node, or build with this node's")
        if not re.fullmatch(re.escape(f"{run_root}/run/{name}-") + "[0-9a-f]{16}", run_dir):
            raise d.fail("run_dir", f"{run_dir!r} is not {run_root}/run/{name}-<key> under the run root")
        inputs = _digest_map(d, "inputs", names=True)
        mounts = d.strings("mounts")
        for dest, step in mounts.items():
            why = mount_point_problem(dest, roots=(run_root,))
            if why:
                raise d.fail(f"mounts[{dest!r}]", why)
            if step not in inputs:
                raise d.fail(f"mounts[{dest!r}]", f"names {step!r}, which is not one of the server's inputs")
        ready = d.mapping("ready")
        why = probe_problem(ready)
        if why:
            raise d.fail("ready", why)
        if "file" in ready:
            why = "a container's ready probe cannot be a file on the node" if engine != "host" else \
                ready_file_problem(str(ready["file"]))
            if why:
                raise d.fail("ready.file", why)
        isolation = d.text("isolation", optional=True) or "host"
        if isolation not in ISOLATIONS or (isolation != "host" and engine != "host"):
            raise d.fail("isolation", f"{isolation!r} is not one of {', '.join(ISOLATIONS)} for a host process"
                         if engine == "host" else "is for host processes; a container has namespaces of its own")
        if isolation == "namespaces" and not ({"http", "tcp"} & set(ready)):
            raise d.fail("ready", "of a server in namespaces of its own must be an http or tcp probe (the host "
                                  "reaches it through a forwarder)")
        io_uring = d.text("io_uring", optional=True)
        io_uring = "deny" if io_uring is None else io_uring
        if io_uring not in IO_URING:
            raise d.fail("io_uring", f"{io_uring!r} is not one of {', '.join(IO_URING)}")
        env, from_node = d.strings("env"), d.items("env_from_node", str)
        bad = [n for n in from_node if not ENV_NAME_RE.match(n) or n in env or n.startswith("SNAPBUILD_")]
        if bad or len(set(from_node)) != len(from_node):
            raise d.fail("env_from_node", f"{(bad or from_node)[0]!r} is not a variable name of its own (a name "
                                          "once, not in env, not SNAPBUILD_*)")
        spec = cls(name=name, argv=argv, ready=ready, run_root=run_root, run_dir=run_dir, env=env,
                   env_from_node=from_node, cwd=d.text("cwd", optional=True), inputs=inputs, mounts=mounts,
                   isolation=isolation, io_uring=io_uring)
        if engine not in CONTAINER_ENGINES:
            return spec
        options = d.mapping("engine_options", optional=True) or {}
        unknown = sorted(set(options) - set(ENGINE_OPTIONS))
        if unknown:
            raise d.fail("engine_options", f"{', '.join(unknown)} are not options of a container engine")
        step = d.text("image_step")
        if unsafe_name(step):
            raise d.fail("image_step", "is not a plain step name")
        return replace(spec, image=d.digest("image"), image_step=step, engine_options=dict(options),
                       image_config=d.mapping("image_config"))

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items()
               if k not in ("image", "image_step", "engine_options", "image_config", "tree_images")}
        if self.isolation == "host":
            del out["isolation"]  # as runtimes of format 1 and 2 are
        if not self.env_from_node:
            del out["env_from_node"]  # as runtimes of format 1 to 3 are
        if self.io_uring == "deny":
            del out["io_uring"]  # the default, as sections written before the field read
        if self.image is not None:
            out.update(image=self.image, image_step=self.image_step, engine_options=self.engine_options,
                       image_config=self.image_config)
        return out


@dataclass(frozen=True)
class Runtime:
    """A snapshot's ``runtime`` section: ``checkpoint.json`` plus ``step`` and ``artifact``."""

    engine: str
    process: str
    server: ServerSpec
    format: int = 1  # 2 when shm_files has any (an older runner then says to upgrade)
    pids: list[int] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] | None = None
    after_restore: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    #: A host tree's files in /dev/shm, carried in the artifact's ``shm/`` (runtime.shmfiles).
    shm_files: list[dict[str, Any]] = field(default_factory=list)
    #: A host tree's files in its run folder (path relative to it), carried in the artifact's
    #: ``run_files/`` (runtime.runfiles): format 5.
    run_files: list[dict[str, Any]] = field(default_factory=list)
    #: The folders of a host tree's path-bound unix sockets, made before a restore (runtime.sockdirs).
    socket_dirs: list[str] = field(default_factory=list)
    #: Check requests with their warm-up answers, replayed after each restore (runtime.probe).
    verify: list[dict[str, Any]] = field(default_factory=list)
    step: str | None = None
    artifact: str | None = None

    @property
    def in_container(self) -> bool:
        return self.engine in CONTAINER_ENGINES

    @property
    def images_tree(self) -> str:
        """The tree of the checkpoint's images (the checkpoint step's artifact), which a
        snapshot's runtime section always names (:meth:`SnapshotConfig.from_json`)."""
        if self.artifact is None:
            raise SchemaError("runtime.artifact: missing; this runtime section was not read from a snapshot")
        return self.artifact

    @classmethod
    def from_json(cls, doc: object, where: str = "runtime", node_root: Path | None = None) -> Runtime:
        """``node_root``: this node's run root, which the snapshot's must equal (None:
        not checked, for a machine that only reads the section)."""
        d = _Doc(doc, where)
        fmt = d.version("format", RUNTIME_FORMAT, "checkpoint")
        engine = d.text("engine")
        if engine not in ENGINES:
            raise d.fail("engine", f"{engine!r} is not one of {', '.join(ENGINES)}")
        pids = d.items("pids", int)
        if any(p < 2 for p in pids):
            raise d.fail("pids", "are not process ids")
        step = d.text("step", optional=True)
        if step is not None and unsafe_name(step):
            raise d.fail("step", "is not a plain step name")
        shm_files, run_files = _shm_files(d, fmt, engine), _run_files(d, fmt, engine)
        server = ServerSpec.from_json(d.doc.get("server"), f"{where}.server", engine, node_root)
        if server.isolation != "host" and fmt < 3:
            raise d.fail("format", f"{fmt}: a server with isolation {server.isolation!r} needs format 3")
        if server.env_from_node and fmt < 4:
            raise d.fail("format", f"{fmt}: a server with env_from_node needs format 4")
        socket_dirs = d.items("socket_dirs", str)
        if socket_dirs and (fmt < 2 or engine != "host"):
            raise d.fail("socket_dirs", "are for host-process checkpoints of format 2")
        for i, folder in enumerate(socket_dirs):
            if place(folder, server.run_dir) is None:
                raise d.fail(f"socket_dirs[{i}]", f"{folder!r} is not below {', '.join(SCRATCH)} or the run folder")
        after_restore, verify = _exercises(d, "after_restore"), _checks(d, fmt)
        for key, items in (("after_restore", after_restore), ("verify", verify)):
            for i, item in enumerate(items):
                why = server_request_problem(item["http"], server.ready) if "http" in item else None
                if why:
                    raise d.fail(f"{key}[{i}].http", why)
        return cls(format=fmt, engine=engine, process=d.text("process"), shm_files=shm_files, run_files=run_files,
                   socket_dirs=socket_dirs,
                   server=server, verify=verify,
                   pids=pids, fingerprint=d.mapping("fingerprint", optional=True) or {},
                   gpu=_gpu(d, engine, server.isolation), after_restore=after_restore,
                   stats=d.mapping("stats", optional=True) or {}, step=step, artifact=d.digest("artifact", optional=True))

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "server"}
        out["server"] = self.server.to_json()
        for k in ("step", "artifact"):
            if out[k] is None:
                del out[k]
        for k in ("shm_files", "run_files", "socket_dirs", "verify"):
            if not out[k]:
                del out[k]  # format 1 has none
        return out


_EXERCISE_KEYS = {"http", "run", "body", "headers", "expect", "repeat"}


def _exercise(r: _Doc, extra: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One exercise item (``{"http": "POST /x", ...}`` or ``{"run": "..."}``), checked
    as the recipe's ``Exercise`` is; ``extra``: keys the caller reads itself."""
    unknown = sorted(set(r.doc) - _EXERCISE_KEYS - extra)
    if unknown:
        raise r.fail(unknown[0], "is not a field of an exercise")
    if r.has("http") == r.has("run"):
        raise SchemaError(f"{r.where}: an exercise needs exactly one of http, run")
    kind = "http" if r.has("http") else "run"
    item: dict[str, Any] = {kind: r.text(kind), "headers": r.strings("headers")}
    if r.has("body"):
        item["body"] = r.text("body")
    for key in ("expect", "repeat"):
        if r.has(key):
            item[key] = r.integer(key)
    if item.get("repeat", 1) < 1:
        raise r.fail("repeat", "is not a positive count")
    return item


def _exercises(d: _Doc, key: str) -> list[dict[str, Any]]:
    return [_exercise(_Doc(rec, f"{d.where}.{key}[{i}]")) for i, rec in enumerate(d.items(key, dict))]


GPU_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
GPU_TIMEOUT_MAX_S = 6 * 3600


def _gpu_uuids(d: _Doc, key: str) -> list[str]:
    uuids = d.items(key, str)
    bad = [u for u in uuids if not GPU_UUID_RE.match(u)]
    if bad:
        raise d.fail(key, f"{bad[0]!r} is not a GPU UUID")
    if len(set(uuids)) != len(uuids):
        raise d.fail(key, "names a GPU twice")
    return uuids


def _gpu(d: _Doc, engine: str, isolation: str) -> dict[str, Any] | None:
    """``gpu``: what the root runner does with it is cuda-checkpoint on those PIDs, a
    device map from those UUIDs and device nodes made in a container's /dev, so every
    part is checked against what the engine makes possible."""
    raw = d.mapping("gpu", optional=True)
    if raw is None:
        return None
    g = _Doc(raw, f"{d.where}.gpu")
    pids = g.items("pids", int)
    if not pids or any(p < 1 for p in pids) or len(set(pids)) != len(pids):
        raise g.fail("pids", "must list the CUDA processes' ids, each once")
    if g.text("method") not in ("tool", "driver"):
        raise g.fail("method", "is not tool or driver")
    flags = {}
    for key in ("sandbox", "pid_ns"):
        flags[key] = raw.get(key, False)
        if not isinstance(flags[key], bool):
            raise g.fail(key, "is not true or false")
    if flags["sandbox"] != (engine == "runsc"):
        raise g.fail("sandbox", "is true exactly for engine runsc (cuda-checkpoint inside the sandbox)")
    if flags["pid_ns"] != (engine == "runc" or isolation == "namespaces"):
        raise g.fail("pid_ns", "is true exactly for a runc container or a host process in namespaces of its own")
    timeout = raw.get("timeout_s", 600)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= GPU_TIMEOUT_MAX_S:
        raise g.fail("timeout_s", f"is not a number of seconds up to {GPU_TIMEOUT_MAX_S}")
    _gpu_uuids(g, "uuids")
    fp = _Doc(g.mapping("fingerprint"), f"{g.where}.fingerprint")
    fp.text("model"), fp.text("driver")
    if fp.integer("count") < 1:
        raise fp.fail("count", "is not a number of GPUs")
    _gpu_uuids(fp, "uuids")
    nodes = g.items("device_nodes", str)
    if nodes and engine != "runc":
        raise g.fail("device_nodes", "are for runc containers")
    for i, node in enumerate(nodes):
        if not node.startswith("/dev/") or "\0" in node or ".." in node.split("/") or "//" in node:
            raise g.fail(f"device_nodes[{i}]", f"{node!r} is not a path below /dev")
    return raw


def _checks(d: _Doc, fmt: int) -> list[dict[str, Any]]:
    """``verify``: HTTP requests to the server (a path on its probe's origin) with the
    answer the warm-up got: status, size, sha256 of the body and its first characters."""
    checks = d.items("verify", dict)
    if checks and fmt < 2:
        raise d.fail("verify", "is for checkpoints of format 2")
    out = []
    for i, rec in enumerate(checks):
        r = _Doc(rec, f"{d.where}.verify[{i}]")
        item = _exercise(r, frozenset({"answer", "compare"}))
        if r.has("compare"):
            paths = r.doc["compare"]
            if not isinstance(paths, list) or not 1 <= len(paths) <= 32 or \
                    not all(isinstance(x, str) and x and "\0" not in x for x in paths):
                raise r.fail("compare", "is not a list of 1 to 32 JSON paths")
            item["compare"] = list(paths)
        if "run" in item or "repeat" in item or not on_the_server(item["http"]):
            raise r.fail("http", "is not a request to the server (`METHOD /path`), asked once")
        a = _Doc(r.mapping("answer"), f"{r.where}.answer")
        answer = {"status": a.integer("status"), "bytes": a.integer("bytes"),
                  "sha256": a.text("sha256", pattern=HEX64_RE), "head": a.text("head")}
        if len(answer["head"]) > 4 * 80:
            raise a.fail("head", "is longer than the start of an answer")
        out.append({**item, "answer": answer})
    return out


def _file_records(d: _Doc, field: str, key: str, fmt: int, engine: str, *, since: int, engines: tuple[str, ...],
                  what: str, problem) -> list[dict[str, Any]]:
    """A list of files the runner writes as root (``shm_files``, ``run_files``): each
    ``key`` distinct and without ``problem(value)``, a permission mode and a size; only
    in checkpoints of format ``since`` or newer made by one of ``engines``."""
    files = d.items(field, dict)
    if files and (fmt < since or engine not in engines):
        raise d.fail(field, f"are for {what} checkpoints of format {since}")
    seen: set[str] = set()
    out = []
    for i, rec in enumerate(files):
        r = _Doc(rec, f"{d.where}.{field}[{i}]")
        value = r.text(key)
        why = problem(value) or ("is used twice" if value in seen else None)
        if why:
            raise r.fail(key, f"{value!r} {why}")
        mode, size = r.integer("mode"), r.integer("size")
        if not 0 <= mode <= 0o777 or size < 0:
            raise r.fail("mode" if not 0 <= mode <= 0o777 else "size", "is out of range")
        seen.add(value)
        out.append({key: value, "mode": mode, "size": size})
    return out


def _shm_files(d: _Doc, fmt: int, engine: str) -> list[dict[str, Any]]:
    """``shm_files``: plain, distinct names (they are written to /dev/shm/NAME as root),
    a permission mode and a size, for a host process only."""
    return _file_records(d, "shm_files", "name", fmt, engine, since=2, engines=("host",), what="host-process",
                         problem=unsafe_name)


def _run_files(d: _Doc, fmt: int, engine: str) -> list[dict[str, Any]]:
    """``run_files``: paths relative to the run folder, where the runner writes them as
    root: plain relative paths (no ``..``, no leading ``/``), distinct, none below
    another, none of the runner's own (its log, its input links); a mode and a size."""
    out = _file_records(d, "run_files", "path", fmt, engine, since=5, engines=("host", "runc"),
                        what="host-process and runc",
                        problem=lambda path: unsafe_relpath(path) or (
                            f"is the runner's own (one of {', '.join(RUN_OWN)})" if runner_owned(path) else None))
    paths = {rec["path"] for rec in out}
    for i, rec in enumerate(out):
        if any(p.startswith(rec["path"] + "/") for p in paths):
            raise d.fail(f"run_files[{i}].path", f"{rec['path']!r} is a file with another below it")
    return out


@dataclass(frozen=True)
class SnapshotConfig:
    """The config blob of a snapshot (docs/format.md, "Snapshot format v1")."""

    name: str
    outputs: dict[str, str]
    variant: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    runtime: Runtime | None = None
    tree_images: TreeImages | None = None
    created_by: str | None = None
    format: int = CONFIG_FORMAT

    @classmethod
    def from_json(cls, doc: object, where: str = "config", node_root: Path | None = None) -> SnapshotConfig:
        d = _Doc(doc, where)
        fmt = d.version("format", CONFIG_FORMAT, "snapshot")
        name = d.text("name", pattern=NAME_RE)
        outputs = _digest_map(d, "outputs", names=True)
        runtime = Runtime.from_json(d.doc["runtime"], f"{where}.runtime", node_root) if d.has("runtime") else None
        images = TreeImages.from_json(d.doc["tree_images"], f"{where}.tree_images") if d.has("tree_images") else None
        if runtime is not None:
            if runtime.artifact is None:
                raise d.fail("runtime.artifact", "is missing: a snapshot's runtime names its checkpoint's tree")
            needed = {runtime.artifact, *runtime.server.inputs.values()}
            needed |= {runtime.server.image} if runtime.server.image is not None else set()
            missing = sorted(needed - set(outputs.values()))
            if missing:
                raise d.fail("runtime", f"needs tree {missing[0]}, which is not one of the outputs")
        return cls(format=fmt, name=name, outputs=outputs, variant=d.mapping("variant", optional=True) or {},
                   steps=d.items("steps", dict), runtime=runtime, tree_images=images,
                   created_by=d.text("created_by", optional=True))

    def to_json(self) -> dict:
        out: dict[str, Any] = {"format": self.format, "name": self.name, "variant": self.variant,
                               "outputs": dict(sorted(self.outputs.items())), "steps": self.steps,
                               "runtime": self.runtime.to_json() if self.runtime else None,
                               "created_by": self.created_by}
        if self.tree_images is not None:
            out["tree_images"] = self.tree_images.to_json()
        return out


def read_config(config: dict, where: str) -> SnapshotConfig:
    """Snapshot ``where``'s config, checked for this node (its run root)."""
    try:
        return SnapshotConfig.from_json(config, "config", run_root())
    except SchemaError as e:
        raise SchemaError(f"snapshot {where}: {e.message}; refusing it",
                          hint=e.hint or "the registry or cache holds a corrupt or hostile snapshot (or one built "
                                         "for another node layout); do not use it, and find out who pushed it") from None
