"""The node's settings: one table, one file, one parser of the environment.

Every setting the node side reads (pull, restore, serve, gc, bench) is in
:data:`SETTINGS`, with its key in the node settings file, its type, its default, the
``SNAPBUILD_*`` variable that overrides it and a line of doc. Where a value comes
from, lowest first::

    default  <  the file  <  the environment  <  a command-line flag

The file is TOML: ``--config PATH`` (a global option of ``snapbuild-runner``, which
sets ``$SNAPBUILD_CONFIG`` for its children too), else ``$SNAPBUILD_CONFIG``, else
``/etc/snapbuild/node.toml`` when it exists. A named file that is missing, a file
that is not TOML, an unknown key or a value of the wrong type is a UsageError; a key
of something removed since (:data:`REMOVED`) is ignored, with a warning.
Values are read again on each call (the file is small): nothing goes stale when the
environment changes. Registry credentials (``SNAPBUILD_REGISTRY_USERNAME`` and
``_PASSWORD``) are environment only, never in a file (registry/credentials.py).

A leaf: it imports nothing of snapbuild but ``errors``; the special syntaxes
(``tree_limits``, ``thp_fill``...) are parsed by their own modules from the value.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

log = logging.getLogger(__name__)

CONFIG_ENV = "SNAPBUILD_CONFIG"
DEFAULT_FILE = Path("/etc/snapbuild/node.toml")
TYPES = ("bool", "int", "size", "path", "str", "list")


@dataclass(frozen=True)
class Setting:
    key: str  # in the file
    type: str  # one of TYPES
    default: Any
    env: str  # the variable that overrides the file
    doc: str
    choices: tuple[str, ...] = ()  # for a str: the values it may take (case-insensitive)


SETTINGS: tuple[Setting, ...] = (
    Setting("home", "path", None, "SNAPBUILD_HOME",
            "the node's store (blobs, pins); unset: $XDG_CACHE_HOME/snapbuild, else ~/.cache/snapbuild"),
    Setting("run_root", "path", Path("/var/lib/snapbuild"), "SNAPBUILD_RUN_ROOT",
            "where gc and stop look for written-out trees and containers (snapshots record their own)"),
    Setting("image_cache", "path", None, "SNAPBUILD_IMAGE_CACHE",
            "where checkpoint images are written out; unset: /dev/shm/snapbuild, else the run root"),
    Setting("trust_policy", "path", None, "SNAPBUILD_TRUST_POLICY",
            "the trust policy (JSON); unset: /etc/snapbuild/policy.json when it exists, else none"),
    Setting("lazy_pages", "bool", True, "SNAPBUILD_LAZY_PAGES",
            "host processes: restore with CRIU's lazy pages (restore --lazy-pages)"),
    Setting("pull_direct", "bool", True, "SNAPBUILD_PULL_DIRECT",
            "a restore writes trees and images straight from the registry, not storing their chunks first"),
    Setting("thp_fill", "str", "auto", "SNAPBUILD_THP_FILL",
            "plain restores fill memory with transparent huge pages: auto (not on a free-page-reporting VM), "
            "on or off", choices=("auto", "on", "off")),
    Setting("cache_max", "size", None, "SNAPBUILD_NODE_CACHE_MAX",
            "bound on the node's store (50G): least recently used snapshots go (pull/restore --cache-max)"),
    Setting("tree_limits", "str", None, "SNAPBUILD_TREE_LIMITS",
            "limits of a snapshot's trees, e.g. depth=256,entries=1000000,bytes=1T (unset: the defaults)"),
    Setting("allow_mount_roots", "list", (), "SNAPBUILD_ALLOW_MOUNT_ROOTS",
            "folders in system places (/usr/local/models) where a snapshot's mounts: may be (env: colon-separated)"),
    Setting("tree_images", "str", "on", "SNAPBUILD_TREE_IMAGES",
            "EROFS tree images: on, off (or 0/no/false), or always (mounted from unverified snapshots too)"),
    Setting("hosts_dir", "path", Path("/etc/containerd/certs.d"), "SNAPBUILD_HOSTS_DIR",
            "containerd-style hosts.toml folders: mirrors of oci:// registries"),
    Setting("cdi_dirs", "list", (Path("/etc/cdi"), Path("/var/run/cdi")), "SNAPBUILD_CDI_DIRS",
            "where CDI specs of the node's GPUs are (env: os.pathsep-separated)"),
    Setting("mkfs_erofs", "path", None, "SNAPBUILD_MKFS_EROFS", "mkfs.erofs to run; unset: the one on PATH"),
    Setting("criu", "path", None, "SNAPBUILD_CRIU", "the criu binary; unset: the one on PATH"),
    Setting("registry_plain_http", "bool", False, "SNAPBUILD_REGISTRY_PLAIN_HTTP",
            "oci:// registries over plain HTTP (loopback ones always are); credentials stay in the environment"),
    Setting("s3_endpoint", "str", None, "SNAPBUILD_S3_ENDPOINT",
            "endpoint of s3:// registries; unset: boto3's own (AWS_ENDPOINT_URL)"),
    Setting("log", "str", "warning", "SNAPBUILD_LOG", "log level where no -v is given: debug, info, warning, error"),
)
BY_KEY = {s.key: s for s in SETTINGS}
#: Keys of settings removed since, which an old file may still hold: ignored, with why.
REMOVED = {"lazy_images": "tree images fetched as they are read were removed (they never made a command faster)"}
_ignored: dict[tuple[Path, str], bool] = {}  # (file, removed key) -> warned of yet
# The booleans the environment may spell, case-insensitively.
TRUE, FALSE = ("on", "1", "true", "yes"), ("off", "0", "false", "no")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Value:
    """A setting's effective value and where it came from: ``default``, ``file PATH``,
    ``environment VAR`` or ``flag``."""

    key: str
    value: Any
    source: str
    env: str
    doc: str

    def to_json(self) -> dict:
        return {"key": self.key, "value": _jsonable(self.value), "source": self.source,
                "env": self.env, "doc": self.doc}


def parse_bool(text: str, name: str) -> bool:
    """The one reading of a boolean in the environment: on/off, 1/0, true/false, yes/no."""
    word = text.strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise UsageError(f"{name} must be on or off (or 1/0, true/false, yes/no), not {text!r}")


def parse_size(text: str | int) -> int:
    """Bytes, or a number with K, M, G or T (``50G``, ``1.5T``, ``512MiB``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"size {text!r}: expected a number of bytes, or with K, M, G or T (e.g. 50G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def config_file() -> tuple[Path | None, bool]:
    """The settings file and whether it was named (--config, $SNAPBUILD_CONFIG); None: none."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named), True
    return (DEFAULT_FILE, False) if DEFAULT_FILE.exists() else (None, False)


def read_file(path: Path) -> dict[str, Any]:
    """The file's settings, checked and converted: {key: value}."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"node settings file {path} does not exist",
                         hint=f"it was named by --config or ${CONFIG_ENV}; see docs/runner.md, 'Node settings'") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"node settings file {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"node settings file {path} is not valid TOML: {e}") from None
    out = {}
    for key, raw in doc.items():
        if key in REMOVED:
            _ignored.setdefault((path, key), False)
            warn_removed(unless_unshown=True)
            continue
        s = BY_KEY.get(key)
        if s is None:
            raise UsageError(f"{path}: unknown key {key!r}", hint="the keys: " + ", ".join(BY_KEY)
                             + " (`snapbuild-runner config` lists them)")
        out[key] = _from_toml(s, raw, path)
    return out


def warn_removed(unless_unshown: bool = False) -> None:
    """Warn, once per process, of each removed key (:data:`REMOVED`) in a file read so
    far. ``unless_unshown``: not before log.setup (which calls this) gives the warning a handler."""
    if unless_unshown and not logging.getLogger("snapbuild").handlers:
        return
    for (path, key), warned in list(_ignored.items()):
        if not warned:
            _ignored[path, key] = True
            log.warning("%s: %s is ignored: %s", path, key, REMOVED[key])


def _from_toml(s: Setting, raw: Any, path: Path) -> Any:
    def wrong(expected: str) -> UsageError:
        return UsageError(f"{path}: {s.key} must be {expected}, not {raw!r}", hint=f"{s.key}: {s.doc}")

    if s.type == "bool":
        if not isinstance(raw, bool):
            raise wrong("true or false")
        return raw
    if s.type == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise wrong("an integer")
        return raw
    if s.type == "size":
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise wrong('a size: a number of bytes or a string such as "50G"')
        try:
            return parse_size(raw)
        except UsageError:
            raise wrong('a size: a number of bytes or a string such as "50G"') from None
    if s.type == "list":
        if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
            raise wrong("a list of strings")
        return tuple(Path(x) for x in raw) if s.key == "cdi_dirs" else tuple(raw)
    if not isinstance(raw, str) or not raw:
        raise wrong("a path (a string)" if s.type == "path" else "a string")
    return _choice(s, raw, f"{path}: {s.key}") if s.type == "str" else Path(raw)


def _choice(s: Setting, text: str, name: str) -> str:
    if not s.choices:
        return text
    word = text.strip().lower()
    if word not in s.choices:
        raise UsageError(f"{name} must be {', '.join(s.choices[:-1])} or {s.choices[-1]}, not {text!r}")
    return word


def _from_env(s: Setting, text: str) -> Any:
    if s.type == "bool":
        return parse_bool(text, s.env)
    if s.type == "int":
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"{s.env} must be an integer, not {text!r}") from None
    if s.type == "size":
        try:
            return parse_size(text)
        except UsageError as e:
            raise UsageError(f"{s.env}: {e.message}") from None
    if s.type == "list":
        items = [x for x in text.split(os.pathsep if s.key == "cdi_dirs" else ":") if x]
        return tuple(Path(x) for x in items) if s.key == "cdi_dirs" else tuple(items)
    return _choice(s, text, s.env) if s.type == "str" else Path(text)


def _resolve(s: Setting, file: dict[str, Any], path: Path | None, flag: Any) -> Value:
    if flag is not None:
        return Value(s.key, flag, "flag", s.env, s.doc)
    text = os.environ.get(s.env)
    if text:  # set and not empty
        return Value(s.key, _from_env(s, text), f"environment {s.env}", s.env, s.doc)
    if s.key in file:
        return Value(s.key, file[s.key], f"file {path}", s.env, s.doc)
    return Value(s.key, s.default, "default", s.env, s.doc)


def _file() -> tuple[dict[str, Any], Path | None]:
    path, _ = config_file()
    return (read_file(path), path) if path else ({}, None)


def resolve(key: str, flag: Any = None) -> Value:
    """``key``'s effective value and its source; ``flag`` (not None) wins over all."""
    file, path = _file()
    return _resolve(BY_KEY[key], file, path, flag)


def get(key: str, flag: Any = None) -> Any:
    """``key``'s effective value (a flag given as ``flag`` wins)."""
    return resolve(key, flag).value


def said(key: str) -> str:
    """How ``key``'s value was given, for a message: ``VAR=value`` from the environment,
    ``key = value in FILE`` from the settings file."""
    v = resolve(key)
    if v.source.startswith("file "):
        return f"{v.key} = {v.value} in {v.source[5:]}"
    return f"{v.env}={v.value}"


def effective(flags: dict[str, Any] | None = None) -> list[Value]:
    """Every setting, in table order, with its value and source."""
    file, path = _file()
    return [_resolve(s, file, path, (flags or {}).get(s.key)) for s in SETTINGS]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(x) for x in value]
    return value
