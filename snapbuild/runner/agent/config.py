"""The agent's configuration: a TOML file (``--config``) or ``--server`` flags.

See the package docstring for the file's keys; unknown keys are refused with the
place, so a typo never silently changes what a node runs. A key of something removed
since (:data:`REMOVED_KEYS`) is ignored, with a warning, so that old files keep working.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ...errors import UsageError
from ...settings import REMOVED as REMOVED_KEYS

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    name: str
    ref: str
    registry: str | None = None
    publish: int | None = None
    trust_policy: str | None = None
    cold_after: int = 3
    max_restarts: int = 5
    restart_window_s: float = 300
    backoff_s: float = 1
    backoff_max_s: float = 60
    lazy_pages: bool | None = None  # None: $SNAPBUILD_LAZY_PAGES, else on (snapbuild-runner restore --lazy-pages)
    gpus: int = 0  # how many of the node's GPUs the agent gives it (0: none assigned; it sees what it sees)
    share_gpus: bool = False  # it may be placed on GPUs others hold (that share too)

    @property
    def snapshot_name(self) -> str:
        """The snapshot name in ``ref`` (``NAME:TAG`` or ``NAME@DIGEST``)."""
        return self.ref.partition(":")[0].partition("@")[0]


@dataclass
class AgentConfig:
    servers: list[ServerConfig]
    poll_s: float = 30
    api: str = "127.0.0.1:9411"
    state_dir: Path = Path("/var/lib/snapbuild/agent")
    cache_max: int | None = None  # bytes of the node's store (least recently used snapshots go)
    stale_after_s: float = 60  # /healthz fails when the supervisor loop has not run for this long


#: ``replicas = K`` is not a server's own: it makes K servers of one table (see _expand).
SERVER_KEYS = set(ServerConfig.__dataclass_fields__) | {"replicas"}
AGENT_KEYS = {"registry", "trust_policy", "poll_s", "api", "state_dir", "cache_max", "stale_after_s", "server"}
#: The TOML type each key must have (a number where a float is wanted).
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "ref": (str,), "registry": (str,), "publish": (int,), "trust_policy": (str,),
    "cold_after": (int,), "max_restarts": (int,), "restart_window_s": (int, float), "backoff_s": (int, float),
    "backoff_max_s": (int, float), "lazy_pages": (bool,), "gpus": (int,), "share_gpus": (bool,), "replicas": (int,), "poll_s": (int, float), "api": (str,), "state_dir": (str,),
    "cache_max": (str, int), "stale_after_s": (int, float), "server": (list,)}

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", bool: "true or false"}


def _check_types(doc: dict, where: str) -> None:
    for key, value in doc.items():
        want = _TYPES.get(key)
        if want and (not isinstance(value, want) or (isinstance(value, bool) and bool not in want)):
            names = " or ".join(_TYPE_NAMES[t] for t in want)
            raise UsageError(f"{where}: `{key}` must be {names}, not {value!r}")


def load_config(path: Path) -> AgentConfig:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read the agent configuration {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    unknown = set(doc) - AGENT_KEYS
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}",
                         hint=f"the agent takes {', '.join(sorted(AGENT_KEYS))}")
    _check_types(doc, str(path))
    defaults = {k: doc[k] for k in ("registry", "trust_policy") if k in doc}
    servers, seen = [], set()
    for i, s in enumerate(doc.get("server", [])):
        where = f"{path}: [[server]] number {i + 1}"
        if not isinstance(s, dict):
            raise UsageError(f"{where} is not a table")
        for key in sorted(REMOVED_KEYS.keys() & s.keys()):
            log.warning("%s: %s is ignored: %s", where, key, REMOVED_KEYS[key])
            del s[key]
        unknown = set(s) - SERVER_KEYS
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                             hint=f"a server takes {', '.join(sorted(SERVER_KEYS))}")
        if "name" not in s or "ref" not in s:
            raise UsageError(f"{where}: `name` and `ref` are required")
        _check_types(s, where)
        for one in _expand(s, where):
            if one["name"] in seen:
                raise UsageError(f"{where}: a second server named {one['name']!r}")
            seen.add(one["name"])
            servers.append(_located(ServerConfig(**{**defaults, **one}), one.get("registry"), where))
    if not servers:
        raise UsageError(f"{path} declares no [[server]]", hint='add [[server]] with name = "..." and ref = "NAME:TAG"')
    from ..node_cache import parse_size

    return AgentConfig(servers=servers, poll_s=float(doc.get("poll_s", 30)), api=str(doc.get("api", "127.0.0.1:9411")),
                       state_dir=Path(doc.get("state_dir", "/var/lib/snapbuild/agent")),
                       cache_max=parse_size(doc["cache_max"]) if "cache_max" in doc else None,
                       stale_after_s=float(doc.get("stale_after_s", 60)))


def _expand(s: dict, where: str) -> list[dict]:
    """One [[server]] table as the servers it declares: itself, or with ``replicas = K``
    K servers NAME-0 .. NAME-(K-1), the i-th on node port ``publish + i``."""
    if s.get("gpus", 0) < 0:
        raise UsageError(f"{where}: `gpus` must be 0 or more, not {s['gpus']}")
    if "replicas" not in s:
        return [s]
    s = dict(s)
    k = s.pop("replicas")
    if k < 1:
        raise UsageError(f"{where}: `replicas` must be 1 or more, not {k}")
    if k > 1 and s.get("publish") is None:
        raise UsageError(f"{where}: `replicas = {k}` needs `publish`: each replica is served on a node port "
                         "of its own (publish, publish + 1, ...)",
                         hint="the snapshot must run side by side: a container, or `isolation: namespaces`")
    return [{**s, "name": f"{s['name']}-{i}", **({"publish": s["publish"] + i} if s.get("publish") else {})}
            for i in range(k)]


def _located(server: ServerConfig, registry: str | None, where: str) -> ServerConfig:
    """A server whose ``ref`` is a full reference (oci://HOST/REPO/NAME:TAG) gets its
    registry from it: the agent's default registry gives way, an explicit one is an error."""
    from ...registry import locate

    try:
        server.ref, located = locate(server.ref, registry)
    except UsageError as e:
        raise UsageError(f"{where}: {e.message}", hint=e.hint) from None
    server.registry = located if located is not None else server.registry
    return server


def config_from_flags(servers: list[str], *, registry: str | None = None,
                      trust_policy: Path | None = None) -> AgentConfig:
    """``--server NAME=REF`` or ``NAME=REF:PORT`` (a container served on that node port)."""
    out = []
    for text in servers:
        name, eq, ref = text.partition("=")
        if not eq or not name or not ref:
            raise UsageError(f"--server {text!r}: expected NAME=REF or NAME=REF:PORT (e.g. web=app:prod)")
        publish = None
        head, _, last = ref.rpartition(":")
        if head and last.isdigit() and ":" in head:  # NAME:TAG:PORT
            ref, publish = head, int(last)
        out.append(_located(ServerConfig(name=name, ref=ref, registry=registry,
                                         trust_policy=str(trust_policy) if trust_policy else None,
                                         publish=publish), registry, f"--server {text!r}"))
    return AgentConfig(servers=out)
