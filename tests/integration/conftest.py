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
