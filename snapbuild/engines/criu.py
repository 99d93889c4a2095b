"""A thin wrapper around the ``criu`` binary: find it, check it, dump, restore.

CRIU prints "rlimit: Can't setup RLIMIT_NOFILE" on every run in sandboxes; it is
harmless, so success is judged by the exit status and errors are taken from the log
with that line filtered out.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from .. import tools
from ..errors import SnapbuildError

MIN_VERSION = (4, 2)
SETUP_HINT = "install it with: sudo ci/install-criu.sh (builds CRIU >= 4.2; part of ci/setup.sh)"
_HARMLESS = re.compile(r"RLIMIT_NOFILE|Will restore .* with interrupted system call")


class CriuError(SnapbuildError):
    exit_code = 8

    def __init__(self, message: str, *, log_excerpt: str = "", hint: str | None = None, log: Path | None = None):
        super().__init__(message, hint=hint)
        self.log_excerpt = log_excerpt
        self.log = log  # CRIU's full log, which the hint names: a caller that moves it rewrites the hint


def binary() -> str:
    from .. import settings

    named = settings.get("criu")
    if named:
        override = str(named)
        if not os.access(override, os.X_OK):
            raise CriuError(f"{settings.said('criu')} is not an executable file", hint=SETUP_HINT)
        return override
    path = shutil.which("criu") or (
        "/usr/local/sbin/criu" if os.path.exists("/usr/local/sbin/criu") else None)
    if not path:
        raise CriuError("criu is not installed", hint=SETUP_HINT)
    return path


@functools.lru_cache(maxsize=1)
def version() -> str:
    out = tools.run([binary(), "--version"], tool="criu", timeout=30, what="criu --version", error=CriuError).stdout
    m = re.search(r"Version:\s*(\S+)", out)
    if not m:
        raise CriuError(f"cannot read the version of {binary()}: {out.strip()!r}", hint=SETUP_HINT)
    return m.group(1)


def check_version() -> None:
    v = version()
    parts = tuple(int(x) for x in re.findall(r"\d+", v)[:2])
    if parts < MIN_VERSION:
        raise CriuError(f"criu {v} is too old (need >= {'.'.join(map(str, MIN_VERSION))}: older ones fail "
                        "on current kernels or with TCP sockets)", hint=SETUP_HINT)


def errors_from_log(log: Path, n: int = 8) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errs = [ln for ln in lines if ("Error" in ln or "error" in ln) and not _HARMLESS.search(ln)]
    return "\n".join((errs or lines)[-n:])


#: CRIU's own error lines: ``(00.063278)  10788: Error (criu/files-reg.c:2353): ...``,
#: ``pie: 9698: Error (criu/pie/parasite.c:588): ...``.
_ERROR_LINE = re.compile(r"\bError \([^)]*\): ")

#: What CRIU cannot checkpoint or restore, by the error line its log says it with (the
#: messages of criu 4.2: tests/unit/engines/data): the cause, and what to change. A
#: cause may name what the pattern's first group caught (``{0}``).
LIMITS = [
    (re.compile(r"Can't open file (\S.*?) on restore: No such file or directory"),
     "the file /{0}, which a process of the server had open or mapped at the checkpoint, is not on this node",
     "a checkpoint carries what the server holds in /dev/shm and in its run folder ($SNAPBUILD_RUN): keep "
     "files it writes at start-up there (e.g. caches: VLLM_CACHE_ROOT=$SNAPBUILD_RUN/vllm-cache) and rebuild "
     "the snapshot with this snapbuild; files elsewhere must come from one of its inputs"),
    (re.compile(r"External socket is used|Can't dump half of stream unix connection"),
     "a process of the server holds a unix socket connected to a process outside its tree (a log daemon, "
     "a parent shell, a sidecar): the peer is not in the checkpoint and no node would have it",
     "open such connections after the checkpoint (an `after_restore:` call can make the server reconnect), "
     "or start the peer inside the server's process tree"),
    (re.compile(r"Connected TCP socket.*external|Can't dump established TCP"),
     "a TCP connection to a peer that the checkpoint cannot carry",
     "close client connections before the warm-up ends (the exercise's connections are closed for you)"),
    # criu 4.2 cannot pass an io_uring descriptor over its socket (the kernel refuses,
    # EINVAL): that is all its log says; older ones named the anon inode
    (re.compile(r"send_fds failed \(-22\)|anon_inode:\[io_uring\]"),
     "an io_uring instance (CRIU cannot checkpoint io_uring)",
     "snapbuild denies io_uring to the servers it starts (libuv and uvloop then use epoll) unless the warm-up "
     "says `io_uring: allow`: remove that, or create the io_uring after the restore"),
    (re.compile(r"fanotify|inotify.*(?:Can't|Unable)"),
     "a file-system watch (inotify or fanotify) on a path that a node may not have",
     "watch files only after the restore, or disable auto-reload (uvicorn --reload, gunicorn --reload)"),
    (re.compile(r"is outside of the dumped tree|foreign process group|session leader .* not"),
     "a process of the tree belongs to a session or process group outside it",
     "let the server be the leader of its own session (snapbuild starts it so): do not setsid or setpgid "
     "children across the tree's boundary"),
    (re.compile(r"Unable to seize|Can't freeze|exited unexpectedly|No such process"),
     "a process of the tree exited while it was being checkpointed",
     "let workers settle before the warm-up ends (a last exercise call that waits for them), and do not "
     "recycle workers during the warm-up (gunicorn --max-requests)"),
]


def explain(excerpt: str) -> tuple[str, str] | None:
    """(the cause, what to change) for a CRIU failure it recognises, judged by CRIU's
    error lines only when the excerpt has any (a path or an info line that happens to
    hold a word such as "during" says nothing), else by all of it (runc's stderr). The
    table's order decides between causes."""
    lines = excerpt.splitlines()
    errors = "\n".join(ln for ln in lines if _ERROR_LINE.search(ln)) or excerpt
    for pattern, what, change in LIMITS:
        m = pattern.search(errors)
        if m:
            return what.format(*m.groups()), change
    return None


def run(args: list[str], *, log: Path, what: str, wrap=None) -> None:
    """``criu ARGS``, logging to ``log`` (in the images or work folder the args name);
    ``wrap`` turns that command line into the one to run."""
    argv = [binary(), *args, "-o", str(log.name), "-v4"]
    r = tools.run(wrap(argv) if wrap else argv, tool="criu", what=f"criu {what}", error=CriuError)
    if r.returncode != 0:
        excerpt = errors_from_log(log) or r.stderr.strip()[-1000:]
        known = explain(errors_from_log(log, n=1000) or excerpt)  # the cause may be above the last lines
        if known:
            raise CriuError(f"criu {what} failed: {known[0]}\n{excerpt}", log_excerpt=excerpt,
                            hint=f"{known[1]} (full log: {log})", log=log)
        raise CriuError(f"criu {what} failed (exit {r.returncode}):\n{excerpt}", log_excerpt=excerpt,
                        hint=f"full log: {log}", log=log)


def dump(pid: int, images: Path, *, extra: list[str] = ()) -> None:
    """Dump the process tree rooted at ``pid`` into ``images``; the tree is killed after."""
    images.mkdir(parents=True, exist_ok=True)
    # --link-remap: files a process holds after they were deleted (multiprocessing's
    # semaphores in /dev/shm) are linked back in for the restore (runtime.shmfiles).
    run(["dump", "-t", str(pid), "-D", str(images), "--tcp-established", "--file-locks", "--link-remap", *extra],
        log=images / "dump.log", what=f"dump of pid {pid}")


def restore(images: Path, *, work: Path, extra: list[str] = ()) -> int:
    """Restore detached (``-d``) in a PID namespace of its own (:mod:`snapbuild.runtime.pidns`:
    its PIDs are its own there, whichever tasks hold them on this machine); returns the
    root's PID on this machine. Logs go to ``work``. ``extra`` may hold :data:`THP_FILL`
    (see :func:`thp_fill_unused`)."""
    from ..runtime import pidns

    work.mkdir(parents=True, exist_ok=True)
    pidfile = work / "restore.pid"
    pidfile.unlink(missing_ok=True)
    run(["restore", "-d", "-D", str(images), "-W", str(work), "--tcp-close", "--file-locks",
         "--pidfile", str(pidfile), *extra], log=work / "restore.log", what="restore",
        wrap=lambda argv: pidns.command(str(pidfile), argv))
    return int(pidfile.read_text().strip())


def _die_with_parent() -> None:
    """In the lazy-pages daemon, before exec: SIGKILL when the runner dies, so a runner
    killed mid-restore leaves no daemon to finish a restore nobody will check."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LazyPages:
    """A ``criu lazy-pages`` daemon serving a restored tree's private memory from its
    images through userfaultfd: pages a process touches first come at once, the rest are
    copied behind them, and the daemon exits when every page is in place.

    Until then the tree depends on it: were it to die early, the kernel would fill the
    pages it never sent with zeros. So its exit status is the verdict on the restore
    (:meth:`wait`), and whoever restored the tree stops it when that verdict is bad.
    """

    def __init__(self, images: Path, work: Path):
        self.log = work / "lazy-pages.log"
        r, w = os.pipe()
        try:
            err = open(work / "lazy-pages.stderr", "wb")
        except OSError:
            os.close(r)
            os.close(w)
            raise
        try:
            self.proc = subprocess.Popen(
                [binary(), "lazy-pages", "-D", str(images), "-W", str(work), "-o", self.log.name, "-v1",
                 "--status-fd", str(w)],
                # stderr to a file, not a pipe nobody reads while it runs: a full pipe would block it
                pass_fds=[w], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, process_group=0, preexec_fn=_die_with_parent)
        except OSError as e:
            os.close(r)
            os.close(w)
            raise CriuError(f"cannot start criu lazy-pages: {e}", hint=SETUP_HINT) from None
        finally:
            err.close()  # the daemon has its own copy
        os.close(w)
        with os.fdopen(r, "rb") as status:  # "\0" once it listens; nothing if it died first
            ready = status.read(1) == b"\0"
        if not ready:
            self.proc.wait()
            raise CriuError("criu lazy-pages did not start:\n" + self._why(), hint=f"full log: {self.log}")

    def _why(self) -> str:
        try:
            stderr = (self.log.parent / "lazy-pages.stderr").read_text(errors="replace")
        except OSError:
            stderr = ""
        return errors_from_log(self.log) or stderr.strip()[-1000:] or f"exit {self.proc.returncode}"

    def failed(self) -> str | None:
        """Why the daemon ended before every page was in place, or None (running, or done)."""
        rc = self.proc.poll()
        if rc in (None, 0):
            return None
        return f"criu lazy-pages failed (exit {rc}) before every page was in place:\n{self._why()}"

    def wait(self, timeout: float) -> None:
        """Return once every page is in place; raise CriuError if the daemon failed or
        did not finish within ``timeout`` seconds (it is killed then)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CriuError(f"criu lazy-pages had not sent every page within {timeout:g} s",
                            hint=f"full log: {self.log}") from None
        if rc != 0:
            raise CriuError(self.failed() or "", hint=f"full log: {self.log}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def restore_lazily(images: Path, *, work: Path, extra: list[str] = ()) -> tuple[int, LazyPages]:
    """:func:`restore` with ``--lazy-pages``: the tree runs as soon as its structure is
    back, its memory follows on demand. Returns the root PID and the daemon to wait for."""
    work.mkdir(parents=True, exist_ok=True)
    pages = LazyPages(images, work)
    try:
        return restore(images, work=work, extra=["--lazy-pages", *extra]), pages
    except BaseException:
        pages.kill()
        raise


@functools.lru_cache(maxsize=1)
def lazy_pages_unsupported() -> str | None:
    """None when this kernel and CRIU can restore lazily (userfaultfd, non-cooperative
    events), else what ``criu check`` said."""
    r = tools.run([binary(), "check", "--feature", "uffd-noncoop"], tool="criu", timeout=30,
                  what="criu check --feature uffd-noncoop", error=CriuError)
    said = (r.stdout + r.stderr).strip().splitlines()
    return None if r.returncode == 0 else (said[-1] if said else "criu check --feature uffd-noncoop failed")


THP_ENV = "SNAPBUILD_THP_FILL"
THP_FILL = "--thp-fill"  # ci/criu-patches/restore-thp-fill.patch
BALLOON, F_REPORTING = "0x0005", 5  # virtio's balloon device, and its free page reporting feature bit
NO_REPORTING_ORDER = 11


def thp_fill_unused() -> str | None:
    """None when a plain restore here should read private memory into transparent huge
    pages (``criu restore --thp-fill``: one page fault per 2 MiB, not per 4 KiB; 4.1x
    faster at 4 GiB, docs/benchmarks.md), else why not. ``$SNAPBUILD_THP_FILL``: ``auto``
    (the default) leaves them out on a VM that hands free memory back to its host, where
    a fresh huge page waits for the host and filling with them was 3.3x *slower* than
    with small pages at 4 GiB; ``on`` uses them wherever they work, ``off`` never."""
    want = thp_setting()
    if want == "off":
        from .. import settings

        return settings.said("thp_fill")
    if not has_thp_fill(binary()):
        return f"this criu ({binary()}) has no {THP_FILL}: ci/install-criu.sh builds one with ci/criu-patches"
    mode = thp_mode()
    if mode not in ("always", "madvise"):
        return f"transparent huge pages are {mode or 'not in this kernel'} (/sys/kernel/mm/transparent_hugepage)"
    if want == "auto" and reports_free_pages():
        return ("this VM hands free memory back to its host (virtio-balloon free page reporting), where huge "
                f"pages fill slower than small ones; {THP_ENV}=on to use them anyway")
    return None


def thp_setting() -> str:
    """``$SNAPBUILD_THP_FILL``: auto (when unset), on or off; anything else is refused."""
    from .. import settings

    return str(settings.get("thp_fill"))  # checked against auto, on, off there


@functools.lru_cache(maxsize=4)
def has_thp_fill(path: str) -> bool:
    """Whether the criu at ``path`` knows ``--thp-fill`` (it lists it in ``--help``)."""
    r = tools.run([path, "--help"], tool="criu", timeout=30, what="criu --help", error=CriuError)
    return THP_FILL in r.stdout + r.stderr


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (always, madvise, never), None without them."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


def reports_free_pages(devices: Path = Path("/sys/bus/virtio/devices"),
                       order: Path = Path("/sys/module/page_reporting/parameters/page_reporting_order")) -> bool:
    """Whether this machine is a VM whose balloon driver reports free memory to the
    host (VIRTIO_BALLOON_F_REPORTING negotiated): the host then takes such memory back,
    and the next process to use it waits for the host to give it again. An operator
    turns reporting off with ``page_reporting_order`` 11 (no free block is that big
    where the largest order is 10, x86-64's and arm64's with 4 KiB pages)."""
    try:
        if int(order.read_text()) >= NO_REPORTING_ORDER:
            return False
    except (OSError, ValueError):
        pass
    try:
        entries = list(devices.iterdir())
    except OSError:
        return False
    for dev in entries:
        try:
            if (dev / "device").read_text().strip() != BALLOON or not (dev / "driver").exists():
                continue
            features = (dev / "features").read_text().strip()
        except OSError:
            continue
        if len(features) > F_REPORTING and features[F_REPORTING] == "1":
            return True
    return False
