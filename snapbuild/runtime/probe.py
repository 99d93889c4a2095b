"""Readiness probes and warm-up exercises, as plain dicts (they travel in snapshots).

Probes (one key each, plus ``timeout`` seconds and optional ``interval``)::

    {"http": "http://127.0.0.1:8000/healthz"}   ready when it answers 2xx
    {"tcp": "127.0.0.1:8000"}                   ready when a connection is accepted
    {"log": "Uvicorn running on"}               ready when the server's log matches (regex)
    {"file": "/tmp/ready"}                      ready when the file exists

Exercises (warm caches and JIT paths before a checkpoint)::

    {"http": "POST /infer", "body": "{...}", "headers": {...}, "expect": 200}
    {"run": "curl -s localhost:8000/warm"}

Check requests (a checkpoint's ``verify``): an HTTP exercise whose answer the warm-up
records (:func:`record_checks`) and the runner compares after each restore
(:func:`check_answers`): status and sha256 of the body, with its first bytes to show.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Callable
from urllib.parse import urljoin, urlparse

PROBE_KINDS = ("http", "tcp", "log", "file")
# Probes that watch for a one-time start-up event (a log line, a file appearing). A
# restored process passed that event before its checkpoint and will not repeat it.
STARTUP_EVENT_KINDS = ("log", "file")


class ProbeFailed(Exception):
    """Raised with a message that says what was probed and what was last seen."""


def probe_kind(probe: dict) -> str:
    kinds = [k for k in PROBE_KINDS if k in probe]
    if len(kinds) != 1:
        raise ValueError(f"a probe needs exactly one of {', '.join(PROBE_KINDS)}")
    return kinds[0]


def _check_once(probe: dict, log_path: Path | None, log_offset: int = 0) -> tuple[bool, str]:
    kind = probe_kind(probe)
    target = probe[kind]
    if kind == "http":
        try:
            with urllib.request.urlopen(urllib.request.Request(target), timeout=2) as r:
                return 200 <= r.status < 300, f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            return False, f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            return False, f"{getattr(e, 'reason', e)}"
    if kind == "tcp":
        host, _, port = str(target).rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1):
                return True, "connected"
        except OSError as e:
            return False, str(e)
    if kind == "log":
        text = ""
        if log_path:
            try:
                with open(log_path, "rb") as f:  # only what this run of the server wrote
                    f.seek(log_offset)
                    text = f.read().decode(errors="replace")
            except FileNotFoundError:
                pass
        return re.search(target, text, re.MULTILINE) is not None, "no match in the log yet"
    return Path(target).exists(), "file does not exist yet"


def wait_ready(probe: dict, *, log_path: Path | None = None, log_offset: int = 0,
               alive: Callable[[], bool] = lambda: True, timeout: float | None = None) -> float:
    """Poll ``probe`` until it passes; returns the seconds it took.

    A ``log`` probe reads the log from ``log_offset`` on: the lines an earlier run of
    the server left there do not count. Raises :class:`ProbeFailed` on timeout, or as soon as ``alive()`` says the process
    is gone (no point waiting for a dead server).
    """
    timeout = float(timeout if timeout is not None else probe.get("timeout", 60))
    interval = float(probe.get("interval", 0.05))
    t0 = time.monotonic()
    last = "not tried"
    while True:
        ok, last = _check_once(probe, log_path, log_offset)
        if ok:
            return time.monotonic() - t0
        if not alive():
            raise ProbeFailed(f"the server exited before it was ready ({describe(probe)}: {last})")
        if time.monotonic() - t0 > timeout:
            raise ProbeFailed(f"not ready after {timeout:g} s ({describe(probe)}: last saw {last})")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.1)


def clear_stale(probe: dict) -> None:
    """Before a server starts: remove the ready file an earlier run left, so that a
    ``file`` probe waits for this run to write it."""
    if "file" in probe:
        path = Path(probe["file"])
        if path.is_file() or path.is_symlink():
            path.unlink()


def address(probe: dict | None) -> tuple[str, int] | None:
    """The (host, port) a server with this probe listens on, when the probe says."""
    probe = probe or {}
    if "http" in probe:
        u = urlparse(probe["http"])
        return u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)
    if "tcp" in probe:
        host, _, port = str(probe["tcp"]).rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)
    return None


def pointed_at(probe: dict, host_port: int | None) -> dict:
    """The probe, asking on ``host_port`` of this machine instead of the server's own port
    (a server in a network namespace of its own, reached through a forwarder)."""
    ready = dict(probe)
    addr = address(ready)
    if addr and host_port:
        for k in ("http", "tcp"):
            if k in ready:
                ready[k] = ready[k].replace(f":{addr[1]}", f":{host_port}", 1)
    return ready


def port_in_use(addr: tuple[str, int] | None) -> bool:
    """Whether something accepts connections at ``addr`` (False when ``addr`` is None)."""
    if addr is None:
        return False
    try:
        with socket.create_connection(addr, timeout=0.5):
            return True
    except OSError:
        return False


def describe(probe: dict) -> str:
    kind = probe_kind(probe)
    return f"{kind} {probe[kind]}"


def base_url(probe: dict | None) -> str | None:
    """Where relative exercise paths (``POST /infer``) go: the http probe's origin."""
    if probe and "http" in probe:
        u = urlparse(probe["http"])
        return f"{u.scheme}://{u.netloc}"
    if probe and "tcp" in probe:
        return f"http://{probe['tcp']}"
    return None


def on_base(item: dict) -> dict:
    """An HTTP item with the server's own URL (``GET http://127.0.0.1:8000/x``, which a
    node's schema check allowed) as a path, so that it goes to where this machine reaches
    the server (a published port, a forwarder) rather than the port it was built with."""
    if "http" not in item:
        return item
    method, _, target = str(item["http"]).strip().rpartition(" ")
    if "://" not in target:
        return item
    u = urlparse(target)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return {**item, "http": f"{method} {path}".strip()}


def http_call(spec: dict, base: str | None, timeout: float = 60) -> tuple[int, bytes]:
    """One HTTP exercise or query: ``{"http": "POST /infer", "body": ..., "headers": ...}``."""
    method, _, target = str(spec["http"]).strip().partition(" ")
    if not target:
        method, target = "GET", method
    url = target if "://" in target else urljoin((base or "http://127.0.0.1") + "/", target.lstrip("/"))
    body = spec.get("body")
    data = body.encode() if isinstance(body, str) else body
    headers = dict(spec.get("headers") or {})
    if data is not None and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"  # what an inference API expects; `headers:` overrides it
    req = urllib.request.Request(url, data=data, method=method.upper(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
        raise ProbeFailed(f"{method.upper()} {url} got no answer: {getattr(e, 'reason', None) or e}") from None


def run_exercise(items: list[dict], *, base: str | None, log: Callable[[str], None], env: dict | None = None,
                 timeout: float = 300, shell: Callable[[str, float], subprocess.CompletedProcess] | None = None) -> None:
    """Run the exercises in order. ``run`` items go through ``shell(line, timeout)``
    (default: ``bash -c`` here, with ``env``; a container's runs them inside it)."""
    if shell is None:
        def shell(line: str, t: float) -> subprocess.CompletedProcess:
            from ..tools import run_killing_group

            return run_killing_group(["bash", "-c", line], timeout=t, env=env)
    for i, item in enumerate(items):
        repeat = int(item.get("repeat", 1))
        if "run" in item:
            expect = int(item.get("expect", 0))
            for _ in range(repeat):
                try:
                    r = shell(item["run"], timeout)
                except subprocess.TimeoutExpired:
                    raise ProbeFailed(f"exercise {i} ({item['run']!r}) ran past {timeout:g} s") from None
                if r.returncode != expect:
                    raise ProbeFailed(f"exercise {i} ({item['run']!r}) exited with {r.returncode}, expected "
                                      f"{expect}: {(r.stderr or r.stdout).strip()[-300:]}")
            log(f"exercise {i}: $ {item['run']} x{repeat} -> exit {r.returncode}")
            continue
        expect = int(item.get("expect", 200))
        for _ in range(repeat):
            status, body = http_call(item, base, timeout)
            if status != expect:
                raise ProbeFailed(f"exercise {i} ({item['http']}) answered {status}, expected {expect}: "
                                  f"{body[:200]!r}")
        log(f"exercise {i}: {item['http']} x{repeat} -> {status}")


ANSWER_HEAD = 80  # characters of a check answer kept to show in a mismatch


def answer_of(item: dict, base: str | None, timeout: float = 60) -> dict:
    """What one check request answers: status, size and sha256 of the body (of the
    ``compare`` paths of its JSON, when the item names some), and its start."""
    status, body = http_call(item, base, timeout)
    shown = body
    if item.get("compare"):
        shown = _select(body, item["compare"])
    return {"status": status, "bytes": len(body), "sha256": hashlib.sha256(shown).hexdigest(),
            "head": shown[:ANSWER_HEAD].decode(errors="replace")}


def _select(body: bytes, paths: list[str]) -> bytes:
    """The values at ``paths`` (dots between keys and list indexes) of a JSON body, as
    canonical JSON; a path that is not there is ``null``, a body that is not JSON is
    shown as such."""
    import json

    try:
        doc = json.loads(body)
    except ValueError:
        return b"not JSON: " + body[:ANSWER_HEAD]
    picked = {}
    for path in paths:
        v = doc
        for part in path.split("."):
            if isinstance(v, dict):
                v = v.get(part)
            elif isinstance(v, list) and part.isdigit() and int(part) < len(v):
                v = v[int(part)]
            else:
                v = None
        picked[path] = v
    return json.dumps(picked, sort_keys=True, separators=(",", ":")).encode()


def same_answer(a: dict, b: dict) -> bool:
    return a["status"] == b["status"] and a["sha256"] == b["sha256"]


def describe_answer(a: dict) -> str:
    return f"HTTP {a['status']}, {a['bytes']} bytes (sha256 {a['sha256'][:12]}): {a['head']!r}"


def record_checks(items: list[dict], *, base: str | None, log: Callable[[str], None]) -> list[dict]:
    """Ask each check request twice at warm-up and keep its answer with it; an answer
    that changes from one call to the next could never prove a restore right."""
    recorded = []
    for i, item in enumerate(items):
        expect = int(item.get("expect", 200))
        first = answer_of(item, base)
        if first["status"] != expect:
            raise ProbeFailed(f"verify {i} ({item['http']}) answered {first['status']}, expected {expect}: "
                              f"{first['head']!r}")
        second = answer_of(item, base)
        if not same_answer(first, second):
            raise ProbeFailed(f"verify {i} ({item['http']}) answered differently on two calls in a row "
                              f"({describe_answer(first)}, then {describe_answer(second)}): a check request must "
                              "answer the same every time; ask for something that depends only on the model and the "
                              "input (no counters, clocks or sampling: fix the seed, or temperature 0)")
        log(f"verify {i}: {item['http']} -> {describe_answer(first)}")
        recorded.append({**{k: v for k, v in item.items() if k != "repeat"}, "answer": first})
    return recorded


def check_answers(recorded: list[dict], *, base: str | None, timeout: float = 60) -> str | None:
    """Replay the recorded check requests; the first that answers otherwise, in words
    (None: all the same). A request that gets no answer counts as answering otherwise."""
    for i, item in enumerate(recorded):
        try:
            now = answer_of(item, base, timeout)
        except ProbeFailed as e:
            return f"verify {i} ({item['http']}) got no answer: {e}"
        if not same_answer(item["answer"], now):
            return (f"verify {i} ({item['http']}) answered {describe_answer(now)}; at the warm-up "
                    f"{describe_answer(item['answer'])}")
    return None
