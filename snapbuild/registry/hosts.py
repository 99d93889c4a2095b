"""containerd's registry host configuration: where to read an ``oci://`` registry from.

Fleets that spread images peer to peer (Spegel, Dragonfly, Kraken, a Harbor proxy
cache) say so in ``/etc/containerd/certs.d/HOST[:PORT]/hosts.toml``; snapbuild reads
the same files (``$SNAPBUILD_HOSTS_DIR`` names another folder) instead of asking for a
configuration of its own. The part of the format understood here::

    server = "https://registry.internal:5000"     # the origin (default https://HOST)

    [host."http://localhost:30020"]               # mirrors, tried in file order
      capabilities = ["pull", "resolve"]          # the default; "push" is ignored
      override_path = false                       # false: /v2 is appended to the path
      skip_verify = false
      ca = "ca.pem"                               # or a list; relative to the folder
      client = [["client.pem", "client.key"]]     # or "both.pem"
      dial_timeout = "2s"
      [host."http://localhost:30020".header]
        x-custom = "value"                        # or a list of values

The folder for a registry is ``HOST:PORT`` (or containerd's ``HOST_PORT_``), or
``HOST`` without a port, else ``_default``; none means "the origin only". Top-level
``ca``, ``client``, ``skip_verify``, ``header`` and ``override_path`` apply to the
origin. Nothing here fetches anything: :mod:`.oci` uses the result.
"""

from __future__ import annotations

import os
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UsageError

DEFAULT_DIR = "/etc/containerd/certs.d"
CAPABILITIES = ("pull", "resolve", "push")
DEFAULT_CAPABILITIES = frozenset({"pull", "resolve"})
#: Registries whose API lives on another host than the one images are named by.
ORIGINS = {"docker.io": "https://registry-1.docker.io"}
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Host:
    """One host that answers for a registry: a mirror, or the origin."""

    url: str  # the API root, without a trailing slash: "http://localhost:30020/v2"
    capabilities: frozenset[str] = DEFAULT_CAPABILITIES
    mirror: bool = True
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()  # (certificate, key); key "" when the certificate file holds it
    header: tuple[tuple[str, str], ...] = ()
    dial_timeout: float | None = None

    @property
    def netloc(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def base(self) -> str:
        """``scheme://host[:port]``: what a Location or Link header is relative to."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    def tls(self) -> dict:
        """requests' ``verify=`` and ``cert=`` for this host; nothing when it sets none
        (then requests' defaults apply, as they always did)."""
        out: dict = {}
        if self.skip_verify:
            out["verify"] = False
        elif self.ca:
            out["verify"] = self.ca[0] if len(self.ca) == 1 else _bundle(self.ca)
        if self.client:
            cert, key = self.client[0]  # requests presents one client certificate
            out["cert"] = (cert, key) if key else cert
        return out


@dataclass(frozen=True)
class Hosts:
    """Where to read registry ``registry`` from: ``mirrors`` in order, then ``origin``
    (which also takes every write). ``source`` is the hosts.toml read, if any."""

    registry: str
    origin: Host
    mirrors: tuple[Host, ...] = field(default=())
    source: Path | None = None


def hosts_dir() -> Path:
    from .. import settings

    return Path(settings.get("hosts_dir") or DEFAULT_DIR)


def folder_names(registry: str) -> list[str]:
    """The folders that may configure ``registry`` (``HOST[:PORT]``), first match wins."""
    names = [registry]
    host, sep, port = registry.rpartition(":")
    if sep and host and port.isdigit() and (host.endswith("]") or ":" not in host):
        names.append(f"{host}_{port}_")  # containerd's spelling of HOST:PORT as a folder name
    return names + ["_default"]


def default_origin(registry: str, *, plain: bool) -> str:
    """The origin's URL when no ``server`` says otherwise."""
    return ORIGINS.get(registry) or f"{'http' if plain else 'https'}://{registry}"


def load(registry: str, *, plain: bool, root: Path | None = None) -> Hosts:
    """The hosts for ``registry`` from its folder under ``root`` (default
    :func:`hosts_dir`): the first of :func:`folder_names` that exists, as containerd
    picks it. No folder, or one without a hosts.toml, is the origin alone."""
    root = hosts_dir() if root is None else root
    alone = Hosts(registry, origin=_host(default_origin(registry, plain=plain), {}, root, "", mirror=False))
    folder = next((root / n for n in folder_names(registry) if (root / n).is_dir()), None)
    if folder is None:
        return alone
    path = folder / "hosts.toml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return alone
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the registry host configuration {path}: {e}",
                         hint="fix its permissions or remove it") from None
    return parse(text, registry, path, plain=plain)


def parse(text: str, registry: str, path: Path, *, plain: bool = False) -> Hosts:
    """Read one hosts.toml (``path`` names it in errors, and relative file names are
    relative to its folder)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _bad(path, f"it is not valid TOML: {e}") from None
    folder = path.parent
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise _bad(path, "'host' must be tables: [host.\"https://mirror:5000\"]")
    # tomllib keeps keys in the order they first appear: the file's order of hosts.
    mirrors = []
    for url, table in hosts.items():
        if not isinstance(table, dict):
            raise _bad(path, f"host {url!r} must be a table: [host.{_quote(url)}]")
        mirrors.append(_host(url, table, folder, f"host.{_quote(url)}", mirror=True, path=path))
    server = doc.get("server", default_origin(registry, plain=plain))
    if not isinstance(server, str) or not server:
        raise _bad(path, "'server' must be a URL string, like server = \"https://registry.internal:5000\"")
    top = {k: v for k, v in doc.items() if k not in ("host", "server")}
    origin = _host(server, top, folder, "server", mirror=False, path=path)
    return Hosts(registry, origin=origin, mirrors=tuple(mirrors), source=path)


def _host(url: str, table: dict, folder: Path, where: str, *, mirror: bool, path: Path | None = None) -> Host:
    def bad(what: str) -> UsageError:
        return _bad(path or folder, f"{where}: {what}")

    if not url.startswith(("http://", "https://")):
        if "://" in url:
            raise bad(f"{url!r} is not an http:// or https:// URL")
        url = "https://" + url
    parts = urlsplit(url)
    if not parts.netloc or parts.query or parts.fragment:
        raise bad(f"{url!r} is not a host URL, like https://mirror.internal:5000")
    override = table.get("override_path", False)
    if not isinstance(override, bool):
        raise bad("override_path must be true or false")
    api = posixpath.normpath(parts.path) if parts.path else ""
    api = "" if api in ("/", ".") else api
    if not override and not api.endswith("/v2"):
        api += "/v2"
    caps = table.get("capabilities") or []
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise bad('capabilities must be a list, like ["pull", "resolve"]')
    unknown = [c for c in caps if c.lower() not in CAPABILITIES]
    if unknown:
        raise bad(f"unknown capability {unknown[0]!r} (known: {', '.join(CAPABILITIES)})")
    skip = table.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise bad("skip_verify must be true or false")
    return Host(url=f"{parts.scheme}://{parts.netloc}{api}",
                capabilities=frozenset(c.lower() for c in caps) or DEFAULT_CAPABILITIES, mirror=mirror,
                skip_verify=skip, ca=_ca(table.get("ca"), folder, bad), client=_client(table.get("client"), folder, bad),
                header=_header(table.get("header"), bad), dial_timeout=_duration(table.get("dial_timeout"), bad))


def _ca(value, folder: Path, bad) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise bad("ca must be a file name or a list of them")
    return tuple(str(folder / v) for v in value)  # an absolute name stays as it is


def _client(value, folder: Path, bad) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise bad('client must be a file name, a list of them, or [["cert.pem", "key.pem"], ...]')
    out = []
    for item in items:
        if isinstance(item, str) and item:
            out.append((str(folder / item), ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) and v for v in item):
            out.append((str(folder / item[0]), str(folder / item[1])))
        else:
            raise bad(f"client entry {item!r} is neither a file name nor a [certificate, key] pair")
    return tuple(out)


def _header(value, bad) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad('header must be a table: [host."URL".header]')
    out = []
    for key, v in value.items():
        if isinstance(v, str):
            out.append((key, v))
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out.append((key, ", ".join(v)))  # one header line, as HTTP allows for a list
        else:
            raise bad(f"header {key!r} must be a string or a list of strings")
    return tuple(out)


def _duration(value, bad) -> float | None:
    """A Go duration ("500ms", "1m30s") in seconds."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not re.fullmatch(f"(?:{_DURATION.pattern})+", value):
        raise bad(f"dial_timeout {value!r} is not a duration, like \"2s\" or \"500ms\"")
    return sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(value))


_BUNDLES: dict[tuple[str, ...], str] = {}


def _bundle(files: tuple[str, ...]) -> str:
    """requests takes one CA file: several are joined into a private temporary one
    (made once per process, removed at exit; never a guessable shared name)."""
    import atexit
    import tempfile

    if files not in _BUNDLES:
        data = b""
        for f in files:
            try:
                data += Path(f).read_bytes().rstrip(b"\n") + b"\n"
            except OSError as e:
                raise UsageError(f"cannot read the CA certificate {f} named in a hosts.toml: {e}") from None
        fd, name = tempfile.mkstemp(prefix="snapbuild-ca-", suffix=".pem")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        atexit.register(lambda: Path(name).unlink(missing_ok=True))
        _BUNDLES[files] = name
    return _BUNDLES[files]


def _quote(url: str) -> str:
    return '"' + url.replace('"', '\\"') + '"'


def _bad(path: Path, what: str) -> UsageError:
    return UsageError(f"registry host configuration {path}: {what}",
                      hint="fix the file (the format is containerd's hosts.toml), or remove it to read from "
                           "the registry itself")
