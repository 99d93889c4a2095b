"""Real parts for the container tests: a private Docker engine and a base root filesystem."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    """A real OCI registry (CNCF distribution, Debian's docker-registry) on 127.0.0.1,
    with filesystem storage in a temporary folder; yields its host:port."""
    import shutil
    import socket
    import time
    import urllib.request

    binary = shutil.which("docker-registry")
    assert binary, "docker-registry is not installed (run ci/setup.sh as root)"
    root = tmp_path_factory.mktemp("registry")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / "config.yml").write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n")
    proc = subprocess.Popen([binary, "serve", str(root / "config.yml")], stdout=open(root / "log", "wb"),
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (root / "log").read_text()
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
