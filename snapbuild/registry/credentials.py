"""Registry credentials, found where docker and podman keep them.

First found wins:

1. ``SNAPBUILD_REGISTRY_USERNAME`` and ``SNAPBUILD_REGISTRY_PASSWORD``;
2. each auth file in podman's then docker's order: ``$REGISTRY_AUTH_FILE``,
   ``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.config/containers/auth.json``,
   ``$DOCKER_CONFIG/config.json``, ``~/.docker/config.json``; in each, in docker's
   order: the credential helper named for the host in ``credHelpers``, then the one
   in ``credsStore``, then the host's entry in ``auths``.

A helper is the program ``docker-credential-NAME`` (ECR's ``ecr-login``, GCR's
``gcr``, ACR's ``acr-env``, ``desktop``, ``pass``, ``secretservice``...), spoken to
as docker does: ``get`` with the registry's host on stdin, ``{"Username", "Secret"}``
as JSON on stdout, and "credentials not found" (any exit status but 0 with that
text) when it holds none for the host. Credentials are looked up only when a
registry asks for them, and never logged.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import RegistryError

HELPER_TIMEOUT_S = 60


def auth_files() -> list[Path]:
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path.home() / ".config" / "containers" / "auth.json")
    if os.environ.get("DOCKER_CONFIG"):
        files.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    files.append(Path.home() / ".docker" / "config.json")
    return list(dict.fromkeys(files))


def _keys(host: str) -> tuple[str, ...]:
    """How a host may be spelled in an auth file."""
    return (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/")


def credentials(host: str, *, env: bool = True) -> tuple[str, str] | None:
    """(username, password) for ``host``, or None when nothing holds any. ``env``: the
    environment's pair, which names no host, counts (for the registry itself; a mirror
    gets only what is kept for its own host)."""
    user, password = os.environ.get("SNAPBUILD_REGISTRY_USERNAME"), os.environ.get("SNAPBUILD_REGISTRY_PASSWORD")
    if env and user and password:
        return user, password
    for path in auth_files():
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise RegistryError(f"cannot read the registry auth file {path}: {e}",
                                hint="fix or remove it (it is docker's or podman's JSON)") from None
        if not isinstance(doc, dict):
            continue
        helpers = doc.get("credHelpers") or {}
        named = next((helpers[k] for k in _keys(host) if isinstance(helpers.get(k), str)), None)
        for helper in (named, doc.get("credsStore")):
            if isinstance(helper, str) and helper:
                found = from_helper(helper, host, path)
                if found:
                    return found
        auths = doc.get("auths") or {}
        for key in _keys(host):
            entry = auths.get(key)
            if isinstance(entry, dict):
                found = _from_entry(entry, path, key)
                if found:
                    return found
    return None


def _from_entry(entry: dict, path: Path, key: str) -> tuple[str, str] | None:
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise RegistryError(f"{path}: auths[{key!r}].auth is not base64 of USER:PASSWORD",
                                hint=f"log in again (docker login {key}), or fix the entry")
        return user, password
    if entry.get("username") and entry.get("password"):
        return str(entry["username"]), str(entry["password"])
    return None


def from_helper(name: str, host: str, source: Path) -> tuple[str, str] | None:
    """Ask ``docker-credential-NAME get`` for ``host``'s credentials."""
    program = shutil.which(f"docker-credential-{name}")
    if program is None:
        raise RegistryError(f"{source} names the credential helper {name!r} for {host}, but "
                            f"docker-credential-{name} is not on PATH",
                            hint=f"install docker-credential-{name}, or remove it from {source}")
    try:
        r = subprocess.run([program, "get"], input=host, capture_output=True, text=True, timeout=HELPER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RegistryError(f"docker-credential-{name} get ({host}) did not answer within {HELPER_TIMEOUT_S} s",
                            hint="is it waiting for a keychain to be unlocked?") from None
    if r.returncode != 0:
        said = (r.stdout + r.stderr).strip()
        if "credentials not found" in said.lower():
            return None
        raise RegistryError(f"docker-credential-{name} get ({host}) failed (exit {r.returncode}): {said[-300:]}",
                            hint=f"check the helper: echo {host} | docker-credential-{name} get")
    try:
        doc = json.loads(r.stdout)
        user, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"docker-credential-{name} get ({host}) did not print "
                            '{"Username": ..., "Secret": ...}',
                            hint=f"check the helper: echo {host} | docker-credential-{name} get") from None
    if not secret:
        return None
    return str(user), str(secret)
