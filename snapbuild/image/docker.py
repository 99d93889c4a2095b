"""The Docker engine, through the docker SDK: load a base, build on it, save the result.

Builds use host networking (``network_mode=host``): the daemon here runs without a
bridge (``dockerd --bridge=none --iptables=false``). ``$DOCKER_HOST`` picks the daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from collections.abc import Callable

from ..errors import SnapbuildError, StepError

DAEMON_FLAGS = ["--bridge=none", "--iptables=false"]
START_HINT = ("start the Docker engine (as root: dockerd " + " ".join(DAEMON_FLAGS) + "), "
              "or set DOCKER_HOST to a running one")


class DockerUnavailable(SnapbuildError):
    exit_code = 4


def client():
    """A client of the running daemon, or a clear error saying how to start one."""
    try:
        import docker
    except ImportError:
        raise DockerUnavailable("the docker Python SDK is not installed",
                                hint="pip install 'snapbuild[build]'") from None
    try:
        c = docker.from_env(timeout=900)
        c.ping()
        return c
    except Exception as e:  # docker.errors.DockerException and connection errors
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise DockerUnavailable(f"the Docker engine at {where} is not running or not reachable ({_short(e)})",
                                hint=START_HINT) from None


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def load(c, archive: Path) -> str:
    """Load a docker-archive; returns the image id."""
    with open(archive, "rb") as f:
        out = list(c.api.load_image(f))
    for item in out:
        stream = str((item or {}).get("stream", ""))
        if "Loaded image ID:" in stream:
            return stream.split("Loaded image ID:")[1].strip()
        if "Loaded image:" in stream:
            return c.images.get(stream.split("Loaded image:")[1].strip()).id
        if (item or {}).get("error"):
            raise StepError(f"docker load failed: {item['error']}")
    raise StepError(f"docker load did not say which image it loaded: {out!r}"[:300])


def build(c, context: Path, dockerfile: str, log: Callable[[str], None], cancel=None) -> str:
    """``docker build`` of ``context`` with ``dockerfile`` (a file in it); the image id."""
    image_id, lines = None, []
    for chunk in c.api.build(path=str(context), dockerfile=dockerfile, network_mode="host", rm=True,
                             forcerm=True, pull=False, decode=True, nocache=False):
        if cancel is not None and cancel.is_set():
            raise StepError("interrupted")
        if "stream" in chunk:
            for line in filter(None, chunk["stream"].splitlines()):
                lines.append(line)
                log(line)
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        if "error" in chunk:
            raise StepError(f"the Dockerfile failed: {chunk['error'].strip()}",
                            log_tail="\n".join(lines[-20:]) + "\n",
                            hint="its output is above; the whole build log: snapbuild logs RECIPE STEP")
    if not image_id:
        raise StepError("docker build finished without an image id", log_tail="\n".join(lines[-20:]) + "\n")
    return image_id


def save(c, image_id: str, dest: Path) -> None:
    with open(dest, "wb") as f:
        for part in c.api.get_image(image_id):
            f.write(part)


def remove(c, image_id: str) -> None:
    try:
        c.api.remove_image(image_id, force=True, noprune=False)
    except Exception:  # in use by another build, or already gone: not ours to fail on
        pass


# --- starting a daemon (tests and the demo) -------------------------------------------

def start_daemon(root: Path, *, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """Start a private ``dockerd`` with its state under ``root``; returns it and its
    DOCKER_HOST. For tests and demos on machines where no daemon runs."""
    dockerd = shutil.which("dockerd")
    if not dockerd:
        raise DockerUnavailable("dockerd is not installed", hint="run ci/setup.sh as root (installs docker.io)")
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    host = f"unix://{sock}"
    log = open(root / "dockerd.log", "ab")
    proc = subprocess.Popen([dockerd, *DAEMON_FLAGS, "--data-root", str(root / "data"),
                             "--exec-root", str(root / "exec"), "--pidfile", str(root / "dockerd.pid"),
                             "-H", host], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    import docker

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DockerUnavailable(f"dockerd exited with {proc.returncode}; see {root / 'dockerd.log'}")
        try:
            docker.DockerClient(base_url=host, timeout=5).ping()
            return proc, host
        except Exception:
            time.sleep(0.2)
    proc.terminate()
    raise DockerUnavailable(f"dockerd did not answer within {timeout:g} s; see {root / 'dockerd.log'}")


def stop_daemon(proc: subprocess.Popen, root: Path | None = None) -> None:
    """Stop a daemon from :func:`start_daemon`, and unmount what it left under ``root``
    (its network namespace file and storage mounts outlive it)."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if root is None:
        return
    prefix = str(root.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
