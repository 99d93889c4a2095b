"""Running the external tools snapbuild drives: criu, runc/runsc, ip, mount, umount,
mkfs.erofs, nvidia-smi, cuda-checkpoint.

Every call has a time limit. A tool that runs past it is killed with everything it
started in its process group (``subprocess.run`` kills only the tool and then waits for
the pipes its children still hold open, which can hang for ever), and the caller gets a
:class:`~snapbuild.errors.SnapbuildError` that names the tool, what it was doing and the
limit. A restore whose engine hangs therefore fails like any failed restore, and the
runner boots the server cold with that reason.

Each tool's limit has a default here and an override in the environment,
``SNAPBUILD_<TOOL>_TIMEOUT`` in seconds (``SNAPBUILD_CRIU_TIMEOUT=1200`` for a very big
checkpoint).

Standard library only: this is imported on nodes.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence

from .errors import SnapbuildError

#: Default limits in seconds, by tool. A checkpoint's time grows with the memory it
#: holds (tens of GB take minutes); the rest are quick or nothing.
LIMITS = {
    "criu": 900.0,
    "runc": 900.0,  # checkpoint and restore run CRIU
    "runsc": 900.0,
    "ip": 30.0,
    "mount": 120.0,
    "umount": 60.0,
    "mkfs.erofs": 1800.0,
    "nvidia-smi": 30.0,
    "cuda-checkpoint": 900.0,
    "s3": 60.0,  # a weights step's S3 source: each request's read timeout (steps.weight_sources)
    "hub": 60.0,  # a weights step's Hugging Face Hub: the metadata requests' timeout
}
DEFAULT_LIMIT = 300.0


def limit(tool: str) -> float:
    """The time limit for ``tool`` (a name from :data:`LIMITS`): its environment
    override when one is set and valid, else the default."""
    try:
        value = float(os.environ.get(env_key(tool), ""))
        if value > 0:
            return value
    except ValueError:
        pass
    return LIMITS.get(tool, DEFAULT_LIMIT)


def env_key(tool: str) -> str:
    """The environment variable that overrides ``tool``'s limit."""
    return "SNAPBUILD_" + "".join(c if c.isalnum() else "_" for c in tool.upper()) + "_TIMEOUT"


def tool_name(argv: Sequence[str]) -> str:
    return os.path.basename(str(argv[0]))


def run_killing_group(argv: Sequence[str], *, timeout: float | None = None, capture_output: bool = True,
                      text: bool = True, stdin=subprocess.DEVNULL, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` with one difference: on timeout the whole process group of the
    tool is killed before :class:`subprocess.TimeoutExpired` is raised, so no child of it
    keeps running or keeps its pipes open. Same signature, for code that takes a
    ``run=`` function (the GPU tools, whose tests pass stand-ins)."""
    if capture_output:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
    if "input" in kw:
        stdin = subprocess.PIPE
    data = kw.pop("input", None)
    with subprocess.Popen(list(argv), text=text, stdin=stdin, process_group=0, **kw) as p:
        try:
            out, err = p.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            _kill_group(p)
            try:
                out, err = p.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild that left the group holds a pipe
                out, err = None, None
            raise subprocess.TimeoutExpired(e.cmd, e.timeout, output=out, stderr=err) from None
        except BaseException:
            _kill_group(p)
            raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run(argv: Sequence[str], *, what: str | None = None, tool: str | None = None, timeout: float | None = None,
        error: type[SnapbuildError] = SnapbuildError, hint: str | None = None,
        **kw) -> subprocess.CompletedProcess:
    """Run a tool to completion and return its result (the caller judges the exit
    status). ``tool`` names it in :data:`LIMITS` (default: the program's file name);
    ``timeout`` defaults to its :func:`limit`. A tool that is missing (``hint`` then says
    how to get it), or that runs past the limit, raises ``error`` (a SnapbuildError
    class) saying so; the message names ``what`` the call was doing."""
    name = tool or tool_name(argv)
    timeout = limit(name) if timeout is None else timeout
    what = what or " ".join([name, *[str(a) for a in argv[1:3]]])
    try:
        return run_killing_group(argv, timeout=timeout, **kw)
    except FileNotFoundError:
        raise error(f"{what}: {argv[0]} is not installed", hint=hint) from None
    except subprocess.TimeoutExpired:
        raise error(f"{what} did not finish within {timeout:g} s and was killed",
                    hint=f"set {env_key(name)} (seconds) to allow it longer") from None


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        p.kill()


#: What the guard runs: read process group IDs, one a line, until end of file (this
#: process's end of the pipe closes when it exits, however it exits), then SIGKILL each
#: group and its leader (the init of a PID namespace need not lead a group; killing it
#: ends the namespace). A release kills the guard before it reads the end.
_GUARD = ('groups=(); while read -r g; do groups+=("$g"); done; '
          'for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null; kill -KILL "$g" 2>/dev/null; done')


class OrphanGuard:
    """Kills process groups this process started if this process dies first, SIGKILL
    included: a build killed mid-step must not leave its commands writing into the store
    or its warm-up server holding a port. A ``bash`` in a session of its own reads the
    groups to kill from a pipe whose only writer is this process; when the write end
    closes, the kernel wakes it and it kills them. :meth:`release` stops it, without a
    signal, once the caller has stopped the groups itself (so it never signals a reused
    PID). A group started before :meth:`add` names it is not covered in between: add it
    as soon as its leader exists."""

    def __init__(self, *pgids: int) -> None:
        r, self._w = os.pipe()  # both ends close-on-exec: no other child holds the write end
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                ["bash", "-c", _GUARD], stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
        except OSError:  # no bash: no guard, as before
            self._proc = None
        finally:
            os.close(r)
        for g in pgids:
            self.add(g)

    def add(self, pgid: int) -> None:
        if self._proc is not None:
            try:
                os.write(self._w, f"{pgid}\n".encode())
            except OSError:  # the guard was killed: nothing to tell
                pass

    def release(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._w >= 0:
            os.close(self._w)
            self._w = -1
