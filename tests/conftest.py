"""Shared fixtures: an isolated store per test, recipe writing, running the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from snapbuild.store import Store

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _machine_dirs(tmp_path, monkeypatch):
    """Servers' run root and the node's image cache go to temp folders, never to the
    machine's defaults (/var/lib/snapbuild, /dev/shm/snapbuild); registries are read
    without the mirrors this machine's containerd may have (/etc/containerd/certs.d):
    a test that wants mirrors points $SNAPBUILD_HOSTS_DIR elsewhere."""
    monkeypatch.setenv("SNAPBUILD_RUN_ROOT", str(tmp_path / "run-root"))
    monkeypatch.setenv("SNAPBUILD_HOSTS_DIR", str(tmp_path / "no-hosts.d"))
    monkeypatch.setenv("SNAPBUILD_IMAGE_CACHE", str(tmp_path / "image-cache"))
    # no node settings file but a test's own (none named: /etc/snapbuild/node.toml only if it exists)
    monkeypatch.delenv("SNAPBUILD_CONFIG", raising=False)
    yield
    _unmount_below(tmp_path)


def _unmount_below(path: Path) -> None:
    """Tree images (EROFS) and bind mounts a test left mounted in its temp folder go,
    deepest first, so that pytest can delete the folder."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    base = str(path.resolve()) + "/"
    points = [f[4].encode().decode("unicode_escape") for f in (line.split(" ") for line in lines) if len(f) > 4]
    for point in sorted({p for p in points if p.startswith(base)}, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _is_subreaper() -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    libc.prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    return bool(flag.value)


@pytest.fixture(autouse=True)
def _no_subreaper_left():
    """A test that makes the test process a child subreaper (snapbuild bench does, for
    its own process) would leave every later test's orphans as its zombies, holding
    their PIDs: later restores then fail at random. Run such code in a child."""
    before = _is_subreaper()
    yield
    assert _is_subreaper() == before, "this test left the test process a child subreaper"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh $SNAPBUILD_HOME for this test (also seen by CLI subprocesses)."""
    h = tmp_path / "home"
    monkeypatch.setenv("SNAPBUILD_HOME", str(h))
    return h


@pytest.fixture
def store(home) -> Store:
    return Store(home)


@pytest.fixture
def project(tmp_path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    return d


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def recipe(project):
    """``recipe(text, name="recipe.yaml")`` writes a recipe into the project folder."""

    def _write(text: str, name: str = "recipe.yaml") -> Path:
        return write(project / name, text)

    return _write


class Result:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"<exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}>"


@pytest.fixture
def run_cli(home):
    """Run the installed console script as a user would, in a subprocess."""

    def _run(*args: str, tool: str = "snapbuild", cwd: Path | None = None, env: dict | None = None,
             timeout: float = 120) -> Result:
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=full_env, timeout=timeout)
        return Result(proc)

    return _run
