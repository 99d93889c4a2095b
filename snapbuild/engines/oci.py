"""``runc`` and ``runsc``: OCI runtimes with the same run / checkpoint / restore shape.

Everything is shared; an engine is the binary's name, the flags its subcommands take,
and how to read its version. runsc (gVisor) checkpoints with its own machinery instead
of CRIU; runc drives CRIU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .. import tools
from ..errors import SnapbuildError
from . import criu
from .fingerprint import host_fingerprint


class OciRuntimeError(SnapbuildError):
    exit_code = 8
    log: Path | None = None  # the runtime's CRIU log, which the hint names (as CriuError.log)


class OciEngine:
    name = "runc"
    binary = "runc"
    needs_criu = True
    install_hint = "install it with: apt-get install runc (part of ci/setup.sh)"
    global_flags: list[str] = []

    def path(self) -> str:
        found = shutil.which(self.binary)
        if not found:
            raise OciRuntimeError(f"{self.binary} is not installed", hint=self.install_hint)  # like a missing criu
        return found

    def check(self) -> None:
        self.path()
        if self.needs_criu:
            criu.binary()
            criu.check_version()

    def version(self) -> str:
        out = tools.run([self.path(), "--version"], tool=self.binary, timeout=30).stdout
        m = re.search(r"version\s+(\S+)", out)
        return m.group(1) if m else out.strip().splitlines()[0] if out.strip() else "unknown"

    def fingerprint(self) -> dict:
        fp = host_fingerprint(criu.version() if self.needs_criu else None)
        fp["oci_runtime"] = f"{self.binary} {self.version()}"
        return fp

    # --- commands -----------------------------------------------------------------------

    def _run(self, args: list[str], what: str, log: Path | None = None, options: dict | None = None) -> None:
        argv = [self.path(), *self.global_flags, *self.option_flags(options or {}), *args]
        r = tools.run(argv, tool=self.binary, what=f"{self.binary} {what}", error=OciRuntimeError)
        if r.returncode != 0:
            excerpt = (criu.errors_from_log(log) if log and log.exists() else "") or r.stderr.strip()[-1500:]
            where = f"full log: {log}" if log and log.exists() else None
            known = criu.explain(excerpt)
            if known:
                err = OciRuntimeError(f"{self.binary} {what} failed: {known[0]}\n{excerpt}",
                                      hint=f"{known[1]} ({where})" if where else known[1])
            else:
                err = OciRuntimeError(f"{self.binary} {what} failed (exit {r.returncode}):\n{excerpt}", hint=where)
            err.log = log if where else None
            raise err

    def option_flags(self, options: dict) -> list[str]:
        """Global flags from the recipe's engine options (none for runc)."""
        return []

    def run(self, bundle: Path, cid: str, options: dict | None = None) -> None:
        self._run(["run", "--detach", "--bundle", str(bundle), cid], "run", options=options)

    def checkpoint(self, cid: str, images: Path, work: Path, options: dict | None = None) -> None:
        images.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self._run(["checkpoint", "--image-path", str(images), "--work-path", str(work), cid], "checkpoint",
                  log=work / "dump.log", options=options)

    def restore(self, bundle: Path, cid: str, images: Path, work: Path, options: dict | None = None) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self._run(["restore", "--detach", "--image-path", str(images), "--work-path", str(work),
                   "--bundle", str(bundle), cid], "restore", log=work / "restore.log", options=options)

    def exec(self, cid: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run a command inside the running container (its environment and namespaces)."""
        return tools.run_killing_group([self.path(), *self.global_flags, "exec", cid, *argv], timeout=timeout)

    def state(self, cid: str) -> dict | None:
        import json

        r = tools.run([self.path(), *self.global_flags, "state", cid], tool=self.binary, timeout=60,
                      error=OciRuntimeError)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def pause(self, cid: str) -> None:
        """Freeze every process of the container (the cgroup freezer)."""
        self._run(["pause", cid], "pause")

    def resume(self, cid: str) -> None:
        self._run(["resume", cid], "resume")

    def delete(self, cid: str) -> None:
        tools.run([self.path(), *self.global_flags, "delete", "--force", cid], tool=self.binary, timeout=120,
                  error=OciRuntimeError)


class RunscEngine(OciEngine):
    """gVisor: the same bundle and commands; checkpoints are gVisor's own (no CRIU).

    Recipe options (``checkpoint: {engine: runsc, runsc: {...}}``): ``compression``
    (``none`` or ``flate-best-speed``, for ``checkpoint``), ``direct`` (O_DIRECT image
    files), ``background`` (restore memory in the background: the server answers
    before every page is back), ``nvproxy`` (GPU access through gVisor's nvproxy).
    """

    name = "runsc"
    binary = "runsc"
    needs_criu = False
    install_hint = ("gVisor's runsc is not packaged for this machine: install it from gVisor's releases "
                    "and put it on PATH")

    def option_flags(self, options: dict) -> list[str]:
        return ["--nvproxy=true"] if options.get("nvproxy") else []

    def checkpoint(self, cid: str, images: Path, work: Path, options: dict | None = None) -> None:
        options = options or {}
        images.mkdir(parents=True, exist_ok=True)
        flags = [f"--image-path={images}", f"--compression={options.get('compression') or 'none'}"]
        flags += ["--direct=true"] if options.get("direct") else []
        self._run(["checkpoint", *flags, cid], "checkpoint", options=options)

    def restore(self, bundle: Path, cid: str, images: Path, work: Path, options: dict | None = None) -> None:
        options = options or {}
        flags = [f"--image-path={images}", "--detach"]
        flags += ["--direct=true"] if options.get("direct") else []
        flags += ["--background=true"] if options.get("background") else []
        self._run(["restore", *flags, "--bundle", str(bundle), cid], "restore", options=options)
