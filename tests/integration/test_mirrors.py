"""Reads through mirrors named in containerd's hosts.toml (registry/hosts.py), against
the real registry: Debian's docker-registry (CNCF distribution) as a mirror holding a
copy, and as a pull-through cache in front of the origin. Where a mirror must misbehave
(serve a wrong blob, answer 404) or be watched (what was it asked?), a small HTTP
server of the tests' own stands in front of a real registry and says what it changes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from snapbuild.build import build
from snapbuild.registry import open_registry, parse_ref
from snapbuild.registry.transfer import push
from snapbuild.runner.pull import pull
from snapbuild.store import Store
from snapbuild.store.snapshot import parse_manifest, referenced_blobs

from testkit import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def snapshot(recipe, store):
    """A files-only snapshot (a few files, one of 3 MiB in chunks) in the local store:
    (store, manifest digest, blobs, the big file's bytes)."""
    path = recipe("""
        name: mirrored
        steps:
          app: {kind: files, root: app}
        publish: {tag: "mirrored:v1"}
    """)
    (path.parent / "app").mkdir()
    (path.parent / "app" / "serve.py").write_text("print('mirrored')\n")
    big = os.urandom(3 << 20)
    (path.parent / "app" / "big.bin").write_bytes(big)
    [res] = build(path, store=store)
    assert res.ok
    manifest = parse_manifest(store.blobs.get(res.snapshot), res.snapshot)
    return store, res.snapshot, referenced_blobs(manifest), big


def publish(snapshot, url: str) -> None:
    store, digest, blobs, _ = snapshot
    push(open_registry(url), parse_ref("mirrored:v1"), digest, blobs, store.blobs)


def hosts_toml(root: Path, registry: str, text: str) -> Path:
    folder = root / registry
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts.toml").write_text(text)
    return folder / "hosts.toml"


@pytest.fixture
def hosts_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "certs.d"
    d.mkdir()
    monkeypatch.setenv("SNAPBUILD_HOSTS_DIR", str(d))
    return d


def pulled_ok(out: Path, big: bytes) -> None:
    assert (out / "app" / "serve.py").read_text() == "print('mirrored')\n"
    assert (out / "app" / "big.bin").read_bytes() == big


class Mirror:
    """A mirror of the tests' own: forwards GET and HEAD to the registry ``upstream``
    (host:port) and records each request (method, path, query). ``corrupt``: the
    digest of a blob it serves wrong bytes for; ``missing``: it answers 404 to all."""

    def __init__(self, upstream: str, *, corrupt: str | None = None, missing: bool = False) -> None:
        self.seen: list[tuple[str, str, dict]] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer()

            def do_GET(self):
                self.answer()

            def answer(self):
                parts = urlsplit(self.path)
                mirror.seen.append((self.command, parts.path, parse_qs(parts.query)))
                if missing:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = urllib.request.Request(f"http://{upstream}{parts.path}", method=self.command,
                                             headers={"Accept": self.headers.get("Accept", "*/*")})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        status, headers, body = r.status, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    status, headers, body = e.code, e.headers, e.read()
                if corrupt and parts.path.endswith(f"/blobs/{corrupt}") and body:
                    body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
                self.send_response(status)
                for name in ("Content-Type", "Docker-Content-Digest"):
                    if headers.get(name):
                        self.send_header(name, headers[name])
                length = headers.get("Content-Length") if self.command == "HEAD" else str(len(body))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.seen if method in (None, m)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirrors():
    made: list[Mirror] = []

    def make(upstream: str, **kw) -> Mirror:
        made.append(Mirror(upstream, **kw))
        return made[-1]

    yield make
    for m in made:
        m.close()


def test_a_mirror_with_a_copy_serves_both_pulls_while_the_origin_is_down(snapshot, oci_registry, hosts_dir,
                                                                        run_cli, tmp_path):
    store, digest, _, big = snapshot
    repo = f"m{time.monotonic_ns()}"
    r = run_cli("push", "mirrored:v1", f"oci://{oci_registry}/{repo}", "--json")
    assert r.code == 0, r
    origin = f"127.0.0.1:{free_port()}"  # nothing listens there
    hosts_toml(hosts_dir, origin, f'[host."http://{oci_registry}"]\n  capabilities = ["pull", "resolve"]\n')
    ref = f"oci://{origin}/{repo}/mirrored:v1"

    out = tmp_path / "out"
    r = run_cli("pull", ref, "--dest", out, "--json", tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(tmp_path / "runner-home")})
    assert r.code == 0, r
    assert r.json()["digest"] == digest
    pulled_ok(out, big)
    assert "Traceback" not in r.err

    r = run_cli("pull", ref, "--json", env={"SNAPBUILD_HOME": str(tmp_path / "node-home")})
    assert r.code == 0 and r.json()["blobs_fetched"] > 0, r
    r = run_cli("inspect", "mirrored:v1", "--json", env={"SNAPBUILD_HOME": str(tmp_path / "node-home")})
    assert r.code == 0 and r.json()["digest"] == digest, r

    # Without the hosts.toml the same pull goes to the origin alone, and fails as it always did.
    (hosts_dir / origin / "hosts.toml").unlink()
    r = run_cli("pull", ref, "--dest", tmp_path / "out2", tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(tmp_path / "runner-home-2"), "SNAPBUILD_LOG": "error"})
    assert r.code == 7 and "tried 4 times" in r.err and "Traceback" not in r.err, r


def test_a_pull_through_cache_serves_the_pull_and_keeps_the_blobs(snapshot, serve_registry, hosts_dir, tmp_path):
    store, digest, blobs, big = snapshot
    origin = serve_registry()
    repo = f"p{time.monotonic_ns()}"
    publish(snapshot, f"oci://{origin.host}/{repo}")
    cache = serve_registry(proxy=f"http://{origin.host}")
    hosts_toml(hosts_dir, origin.host, f'server = "http://{origin.host}"\n\n'
                                       f'[host."http://{cache.host}"]\n  capabilities = ["pull", "resolve"]\n')
    assert not set(blobs) & cache.blobs()

    out = pull(f"oci://{origin.host}/{repo}/mirrored:v1", dest=tmp_path / "out", store=Store(tmp_path / "node"))
    assert out["digest"] == digest
    pulled_ok(tmp_path / "out", big)

    # The cache stores what it fetched beside serving it: wait for it to be there.
    deadline = time.monotonic() + 60
    while not set(blobs) <= cache.blobs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(blobs) <= cache.blobs(), "the pull-through cache holds every blob of the snapshot"
    # The origin's access log: this process sent its blob reads to the cache only.
    reads = [line for line in origin.log().splitlines() if f"GET /v2/{repo}/mirrored/blobs/" in line]
    assert reads, "the cache fetched the blobs from the origin"
    assert not [line for line in reads if "python-requests" in line], "no blob read went to the origin directly"


def test_a_mirror_serving_a_wrong_blob_is_skipped_and_the_origin_serves_it(snapshot, oci_registry, hosts_dir,
                                                                          mirrors, tmp_path, caplog):
    store, digest, blobs, big = snapshot
    repo = f"c{time.monotonic_ns()}"
    publish(snapshot, f"oci://{oci_registry}/{repo}")
    victim = max(blobs, key=store.blobs.size)
    bad = mirrors(oci_registry, corrupt=victim)
    # The origin is the same registry under a second name: 127.0.0.1 and localhost.
    origin = oci_registry.replace("127.0.0.1", "localhost")
    hosts_toml(hosts_dir, origin, f'[host."{bad.url}"]\n')

    node = Store(tmp_path / "node")
    with caplog.at_level(logging.WARNING, logger="snapbuild"):
        out = pull(f"oci://{origin}/{repo}/mirrored:v1", dest=tmp_path / "out", store=node)
    assert out["digest"] == digest
    pulled_ok(tmp_path / "out", big)
    assert all(node.blobs.verify(d) for d in blobs)
    warned = [r.getMessage() for r in caplog.records if victim in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert f"mirror {bad.url}/v2" in warned[0] and "corrupt" in warned[0] and "trying the next host" in warned[0]
    assert bad.paths("GET").count(f"/v2/{repo}/mirrored/blobs/{victim}") == 1, "a mirror's bad blob is not asked twice"
    others = [d for d in blobs if d != victim]
    assert all(f"/v2/{repo}/mirrored/blobs/{d}" in bad.paths("GET") for d in others), "the other blobs came from it"
    assert {q.get("ns", [None])[0] for _, _, q in bad.seen} == {origin}, "every request names the origin in ns"


def test_a_mirror_without_resolve_is_not_asked_for_tags(snapshot, oci_registry, hosts_dir, mirrors, tmp_path):
    store, digest, blobs, big = snapshot
    repo = f"r{time.monotonic_ns()}"
    publish(snapshot, f"oci://{oci_registry}/{repo}")
    pull_only = mirrors(oci_registry)
    origin = oci_registry.replace("127.0.0.1", "localhost")
    hosts_toml(hosts_dir, origin, f'[host."{pull_only.url}"]\n  capabilities = ["pull"]\n')

    out = pull(f"oci://{origin}/{repo}/mirrored:v1", dest=tmp_path / "out", store=Store(tmp_path / "node"))
    assert out["digest"] == digest
    pulled_ok(tmp_path / "out", big)
    asked = pull_only.paths()
    assert f"/v2/{repo}/mirrored/manifests/v1" not in asked, "the tag was resolved at the origin"
    assert f"/v2/{repo}/mirrored/manifests/{digest}" in asked, "the manifest by digest came from the mirror"
    assert sorted(p for p in asked if "/blobs/" in p) == sorted(f"/v2/{repo}/mirrored/blobs/{d}" for d in blobs)


def test_no_hosts_toml_means_the_same_requests_as_ever(snapshot, oci_registry, hosts_dir, mirrors, tmp_path):
    """The watching server is the origin itself here: one HEAD for the tag, one GET for
    the manifest, one per blob, and no ns."""
    store, digest, blobs, big = snapshot
    repo = f"n{time.monotonic_ns()}"
    publish(snapshot, f"oci://{oci_registry}/{repo}")
    watched = mirrors(oci_registry)
    host = watched.url.removeprefix("http://")
    pull(f"oci://{host}/{repo}/mirrored:v1", dest=tmp_path / "out", store=Store(tmp_path / "node"))
    pulled_ok(tmp_path / "out", big)
    assert watched.paths("HEAD") == [f"/v2/{repo}/mirrored/manifests/v1"]
    assert watched.paths("GET").count(f"/v2/{repo}/mirrored/manifests/{digest}") == 1
    assert len(watched.seen) == 2 + len(blobs) and not any(q for _, _, q in watched.seen)


def test_missing_and_unreachable_mirrors_are_skipped_the_dead_one_once(snapshot, oci_registry, hosts_dir, mirrors,
                                                                      tmp_path, caplog):
    store, digest, blobs, big = snapshot
    repo = f"d{time.monotonic_ns()}"
    publish(snapshot, f"oci://{oci_registry}/{repo}")
    empty = mirrors(oci_registry, missing=True)
    dead = f"http://127.0.0.1:{free_port()}"
    origin = oci_registry.replace("127.0.0.1", "localhost")
    hosts_toml(hosts_dir, origin, f'[host."{dead}"]\n[host."{empty.url}"]\n')

    with caplog.at_level(logging.WARNING, logger="snapbuild"):
        out = pull(f"oci://{origin}/{repo}/mirrored:v1", dest=tmp_path / "out", store=Store(tmp_path / "node"),
                   jobs=4)
    assert out["digest"] == digest
    pulled_ok(tmp_path / "out", big)
    messages = [r.getMessage() for r in caplog.records]
    unreachable = [m for m in messages if "cannot be reached" in m]
    assert len(unreachable) == 1 and dead in unreachable[0], caplog.text
    assert not [m for m in messages if "trying again" in m], "a dead mirror costs no retries"
    missing = [m for m in messages if m.startswith(f"mirror {empty.url}/v2")]
    assert len(missing) == 2 + len(blobs) and all("is not in" in m for m in missing), caplog.text


def test_a_malformed_hosts_toml_is_a_usage_error_naming_the_file(oci_registry, hosts_dir, run_cli, tmp_path):
    path = hosts_toml(hosts_dir, oci_registry, '[host."http://127.0.0.1:1"]\n  capabilities = ["pull", "fetch"]\n')
    r = run_cli("pull", f"oci://{oci_registry}/x/mirrored:v1", "--dest", tmp_path / "out", tool="snapbuild-runner")
    assert r.code == 2, r
    assert str(path) in r.err and "unknown capability 'fetch'" in r.err and "Traceback" not in r.err, r


def test_signing_reads_at_the_origin_never_through_a_mirror(snapshot, oci_registry, hosts_dir, mirrors, tmp_path):
    """Signing reads the tag and the referrers index it then extends: a mirror's stale
    copy would make it sign an older manifest or drop signatures. It asks the origin."""
    from snapbuild.registry import open_registry
    from snapbuild.registry.ref import Ref
    from snapbuild.signing import keygen, sign

    store, digest, _, _ = snapshot
    repo = f"s{time.monotonic_ns()}"
    publish(snapshot, f"oci://{oci_registry}/{repo}")
    mirror = mirrors(oci_registry)
    origin = oci_registry.replace("127.0.0.1", "localhost")
    hosts_toml(hosts_dir, origin, f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n')
    private, _ = keygen(tmp_path / "key")
    reg = open_registry(f"oci://{origin}/{repo}")
    out = sign(reg, Ref(name="mirrored", tag="v1"), private)
    assert out["digest"] == digest
    assert mirror.paths() == [], "nothing of the signing was read through the mirror"
    reg.get_manifest("mirrored", digest)  # reads are still the mirror's
    assert mirror.paths() == [f"/v2/{repo}/mirrored/manifests/{digest}"]
