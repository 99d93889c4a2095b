"""Real parts for the integration tests, started on 127.0.0.1 and stopped by fixtures: a
private Docker engine, a base root filesystem, OCI registries (with and without auth,
and pull-through caches) and an S3 server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from snapbuild.runtime import mounts

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory):
    """A Docker engine for the session: the one $DOCKER_HOST names when it answers, else a
    private dockerd (no bridge, no iptables) started here, on its own socket and data
    root, and stopped at the end. Sets $DOCKER_HOST for the tests and their subprocesses."""
    from snapbuild.image import docker as engine

    old = os.environ.get("DOCKER_HOST")
    if old:
        try:
            engine.client()
            yield old
            return
        except engine.DockerUnavailable:
            pass
    root = tmp_path_factory.mktemp("dockerd")
    proc, host = engine.start_daemon(root)
    os.environ["DOCKER_HOST"] = host
    try:
        yield host
    finally:
        engine.stop_daemon(proc, root)
        if old is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = old


@pytest.fixture(scope="session")
def base_rootfs() -> Path:
    """Debian bookworm with python3 and numpy, made once by ci/make-rootfs.sh and cached
    on disk by its package list (about 40 s the first time)."""
    out = subprocess.run([str(REPO / "ci" / "make-rootfs.sh"), "bookworm", "python3,python3-numpy"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"ci/make-rootfs.sh failed:\n{out.stderr}"
    return Path(out.stdout.strip())


def _serve_registry(root: Path, htpasswd: str | None = None, auth_config: str = "", proxy: str | None = None):
    """Start docker-registry (CNCF distribution) on a free port of 127.0.0.1 with storage
    under ``root`` (Basic auth with ``htpasswd``, or the given ``auth:`` config section;
    with ``proxy``, a pull-through cache of the registry at that URL); returns (process,
    host:port). Its log, access log included, goes to ``root/log``."""
    import shutil
    import socket
    import time
    import urllib.error
    import urllib.request

    binary = shutil.which("docker-registry")
    assert binary, "docker-registry is not installed (run ci/setup.sh as root)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    auth = auth_config
    if htpasswd:
        (root / "htpasswd").write_text(htpasswd)
        auth = f"auth: {{htpasswd: {{realm: snapbuild-test, path: {root / 'htpasswd'}}}}}\n"
    (root / "config.yml").write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}, secret: snapbuild-test}}\n" + auth
        + (f"proxy: {{remoteurl: {proxy}}}\n" if proxy else ""))
    proc = subprocess.Popen([binary, "serve", str(root / "config.yml")], stdout=open(root / "log", "wb"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            break
        except urllib.error.HTTPError:  # 401: up, and asking for credentials
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (root / "log").read_text()
            time.sleep(0.1)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    """A real OCI registry (CNCF distribution, Debian's docker-registry) on 127.0.0.1,
    with filesystem storage in a temporary folder; yields its host:port."""
    proc, host = _serve_registry(tmp_path_factory.mktemp("registry"))
    yield host
    proc.terminate()
    proc.wait(timeout=10)


class RegistryServer:
    """A docker-registry of one test's own (see :func:`serve_registry`)."""

    def __init__(self, root: Path, proxy: str | None = None) -> None:
        self.root = root
        self.proc, self.host = _serve_registry(root, proxy=proxy)

    def log(self) -> str:
        return (self.root / "log").read_text(errors="replace")

    def blobs(self) -> set[str]:
        """The digests of the blobs in its storage."""
        found = (self.root / "data").glob("docker/registry/v2/blobs/sha256/*/*/data")
        return {f"sha256:{p.parent.name}" for p in found}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def serve_registry(tmp_path_factory):
    """``serve_registry(proxy=None)`` starts a docker-registry for this test (a
    pull-through cache of the registry at URL ``proxy``, when given), stopped at its
    end or by ``.stop()``: for a registry the test takes down, or whose storage and
    access log it reads."""
    started: list[RegistryServer] = []

    def start(*, proxy: str | None = None) -> RegistryServer:
        # Not "registry*": test_registries corrupts blobs in every folder named so.
        server = RegistryServer(tmp_path_factory.mktemp("own-registry"), proxy=proxy)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def oci_registry_auth(tmp_path_factory):
    """The same registry asking for Basic auth (htpasswd, bcrypt); yields
    (host:port, username, password)."""
    import bcrypt

    user, password = "alice", "s3cret-registry-password"
    line = f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
    proc, host = _serve_registry(tmp_path_factory.mktemp("registry-auth"), line)
    yield host, user, password
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def oci_registry_token(tmp_path_factory):
    """The same registry asking for Bearer tokens (`auth: token`), from a small token
    service of the tests' own (tokenserver.py: the real token services are not
    reachable here); yields (host:port, username, password, token server)."""
    from tokenserver import TokenServer

    root = tmp_path_factory.mktemp("registry-token")
    user, password = "bob", "t0ken-service-password"
    tokens = TokenServer(root, user, password)
    proc, host = _serve_registry(root, auth_config=tokens.registry_auth_config())
    yield host, user, password, tokens
    proc.terminate()
    proc.wait(timeout=10)
    tokens.close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on 127.0.0.1, for the session."""
    import socket
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials for moto (any will do; they must never show up anywhere), and a dead
    default endpoint, so that a call that forgets the test server fails here instead of
    going out to AWS."""
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def s3_bucket(s3_server, aws_env, monkeypatch):
    """A new, empty bucket on the test S3 server, with SNAPBUILD_S3_ENDPOINT pointing
    there (for the code under test): (boto3 client, bucket name)."""
    import time

    import boto3

    monkeypatch.setenv("SNAPBUILD_S3_ENDPOINT", s3_server)
    client = boto3.client("s3", endpoint_url=s3_server)
    name = f"b{time.monotonic_ns()}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture
def mount_point(tmp_path):
    """A mount point for a test's `mounts:`, unmounted after it whatever it left."""
    point = tmp_path / "models" / "m"
    yield point
    while mounts.is_mount_point(point):  # whatever a failed test left mounted
        mounts.unmount(point)
