"""Tree images fetched as they are read: an empty node mounts a tree image (see
:mod:`.erofs`) before it has its bytes, so the server restores and answers while the
rest of the image arrives behind it.

How, for one image (:class:`LazyImage`)::

    registry ─fetch, verify, decompress─► <hex>.erofs.partial  (a sparse file, chunk by chunk)
                                               │ read by
    lazyfs (FUSE, a child process) ─► lazy/<hex>/tree.erofs ─► loop device (read-only) ─► EROFS at the folder

1. The first chunk (the superblock) is fetched and checked before anything is mounted,
   as for an image written out whole (``check``: erofs.image_problem).
2. A child process (:mod:`.lazyfs`) serves the partial file through FUSE; a read of a
   chunk not there yet asks this process for it and waits. Asked chunks jump the queue;
   the others are fetched behind them, in order, on a few threads, once the server is
   up (:func:`finish`): until then the node's CPUs and network go to what the restore
   waits for.
3. The image is mounted from a read-only loop device over that FUSE file.
4. Once every chunk is in place (:func:`finish`, which a restore calls once the server
   is up, and which returns when the image is complete: the command still returns with
   everything on the node), the partial file
   is renamed to the image file, the loop device is switched to it (``LOOP_CHANGE_FD``,
   which the kernel allows for a read-only loop device and a file of the same size),
   and the FUSE mount and its process go away. From then on the mount is exactly
   what a written-out image gives.

Crash safety is that of a written-out image: the image file appears under its name
only complete; a process fetching one holds :func:`layout.lazy_lock` until then, so
another restore sharing the image waits for it, and a mount whose fetcher died (no
image file, nobody holding the lock) counts as absent and is made again
(:func:`complete`). Were the fetcher to die mid-way, reads of what never arrived fail
(EIO) rather than return wrong bytes.

``SNAPBUILD_LAZY_IMAGES`` (on|off) or the runner's ``--lazy-images`` choose it; an
image whose chunks are all in the node's store is written out as before.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import tools
from ..errors import IntegrityError, SnapbuildError
from . import layout

log = logging.getLogger(__name__)

LOOP_CHANGE_FD = 0x4C06


class Unavailable(SnapbuildError):
    """This node cannot serve an image as it is read (no FUSE, no loop device, a mount
    that failed): write it out whole instead."""
# Threads per image: some only for the chunks a read waits for, so that one never
# queues behind the fetches of the rest; the others take those first, then the rest.
ASK_WORKERS = 2
FETCH_WORKERS = 3


def default() -> bool:
    """The node setting ``lazy_images`` (``$SNAPBUILD_LAZY_IMAGES``), else off (docs/benchmarks.md says why)."""
    from .. import settings

    return bool(settings.get("lazy_images"))


def worth(blobs, entry: dict) -> bool:
    """Whether the image file ``entry`` (a tree entry) is to be fetched as it is read:
    ``blobs`` (a store.direct.Direct) asks for it, and the image has several chunks,
    some of them not in the node's store."""
    if not getattr(blobs, "lazy_images", False):
        return False
    chunks = entry["chunks"]
    if len(chunks) < 2 or any("offset" in ref for ref in chunks):
        return False
    return any(ref["enc"] != "zero" and not blobs.is_local(ref["digest"]) for ref in chunks)


_pending: dict[str, LazyImage] = {}
_pending_lock = threading.Lock()


class LazyImage:
    """One tree image mounted at ``folder`` while its bytes are fetched (see the module)."""

    def __init__(self, blobs, entry: dict, path: Path, folder: Path, check) -> None:
        self.blobs, self.entry, self.path, self.folder, self.check = blobs, entry, path, folder, check
        self.partial = layout.image_partial(path)
        self.mnt = layout.lazy_mount_dir(folder)
        self.refs = entry["chunks"]
        self.starts = [0]
        for ref in self.refs:
            self.starts.append(self.starts[-1] + ref["size"])
        self.present = [ref["enc"] == "zero" for ref in self.refs]
        self.left = self.present.count(False)
        self.asked = 0  # chunks a read waited for
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._cond = threading.Condition()
        self._queue: list[tuple[int, int, int]] = []
        self._taken: set[int] = set()
        self._stopping = False
        self._rest_queued = False
        self._workers: list[threading.Thread] = []
        self._lock_fd = self._fd = self._loop_fd = -1
        self.proc: subprocess.Popen | None = None
        self.loop: str | None = None
        self._say = threading.Lock()

    # --- starting --------------------------------------------------------------------

    def start(self) -> None:
        layout.secure_dir(self.path.parent)
        lock = layout.lazy_lock(self.folder)
        lock.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            clear(self.folder)  # what a runner killed mid-fetch left
            self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                               0o400)
            os.ftruncate(self._fd, self.starts[-1])
            self._fetch(0)  # the superblock, checked before the kernel sees any of it
            self.left -= 1
            why = self.check(os.pread(self._fd, self.refs[0]["size"], 0), self.starts[-1])
            if why:
                raise IntegrityError(f"tree image {self.folder.name} is not an EROFS image: {why}; refusing to "
                                     "mount it", hint="the registry holds a corrupt or hostile snapshot; do not use it")
            self._serve()
            self.loop = _losetup(self.mnt / "tree.erofs")
            self._loop_fd = os.open(self.loop, os.O_RDONLY | os.O_CLOEXEC)
            self.folder.mkdir(parents=True, exist_ok=True)
            r = tools.run(["mount", "-t", "erofs", "-o", "ro,nosuid,nodev", self.loop, str(self.folder)],
                          what=f"mount of the tree image {self.path.name}", error=Unavailable)
            if r.returncode != 0:
                raise Unavailable(f"cannot mount the tree image {self.path.name} from {self.loop}: "
                                  f"{r.stderr.strip()}")
            # the mount holds the loop device now: detaching marks it to go with the mount
            tools.run(["losetup", "-d", self.loop], what=f"losetup -d {self.loop}")
        except BaseException:
            self._teardown(failed=True)
            if os.path.ismount(self.folder):  # nothing records it yet: it goes
                tools.run(["umount", "-l", str(self.folder)], what=f"unmount of {self.folder}")
            raise
        for n in range(ASK_WORKERS + FETCH_WORKERS):
            asks = n < ASK_WORKERS
            t = threading.Thread(target=self._work, args=(asks,), daemon=True,
                                 name=f"lazy-image-{'ask' if asks else 'fetch'}-{n}")
            t.start()
            self._workers.append(t)
        if self.left == 0:
            self.done.set()
        with _pending_lock:
            _pending[str(self.folder)] = self
        self.blobs.lazy_started.append(self)

    def _serve(self) -> None:
        """Start the FUSE process and wait for its mount."""
        self.mnt.mkdir(parents=True, exist_ok=True, mode=0o700)
        err = open(layout.lazy_log(self.folder), "wb")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "snapbuild.runtime.lazyfs", str(self.partial), str(self.mnt)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                process_group=0)
        except OSError as e:
            raise Unavailable(f"cannot start the file system that serves a tree image: {e}") from None
        finally:
            err.close()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"sizes": [r["size"] for r in self.refs],
                                              "present": [i for i, ok in enumerate(self.present) if ok]}) + "\n")
            self.proc.stdin.flush()
            # "ready", or nothing when it died; within the time a mount may take
            said = select.select([self.proc.stdout], [], [], tools.limit("mount"))[0]
            started = bool(said) and self.proc.stdout.readline().strip() == "ready"
        except OSError:  # it died before it read what to serve
            started = False
        if not started:
            self.proc.kill()
            self.proc.wait()
            tail = layout.lazy_log(self.folder).read_text(errors="replace").strip()[-500:]
            raise Unavailable(f"the FUSE file system for a tree image did not start (exit {self.proc.returncode}"
                              f"): {tail or 'no output'}",
                              hint="it needs /dev/fuse, libfuse3 (apt-get install fuse3) and mfusepy")
        threading.Thread(target=self._listen, name="lazy-image-asks", daemon=True).start()

    # --- fetching --------------------------------------------------------------------

    def fetch_the_rest(self) -> None:
        """Queue every chunk not there yet behind the asked ones (once). Until then only
        what reads ask for is fetched, leaving the node's CPUs and network to what the
        restore waits for (the checkpoint's images, the other trees, the server's start)."""
        with self._cond:
            if self._rest_queued:
                return
            self._rest_queued = True
            for i, ok in enumerate(self.present):
                if not ok:
                    heapq.heappush(self._queue, (1, i, i))
            self._cond.notify_all()

    def _listen(self) -> None:
        """The FUSE process's asks: chunks a read waits for go to the front of the queue."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip().isdigit():
                with self._cond:
                    self.asked += 1
                    heapq.heappush(self._queue, (0, self.asked, int(line)))
                    self._cond.notify_all()

    def _work(self, asks_only: bool) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._ready_item(asks_only):
                    self._cond.wait()
                if self._stopping:
                    return
                i = heapq.heappop(self._queue)[2]
                self._taken.add(i)
            try:
                self._fetch(i)
            except BaseException as e:  # reads of what did not come fail at once; finish says why
                with self._cond:
                    self.error = self.error or e
                    self._stopping = True
                    self._cond.notify_all()
                for j, ok in enumerate(self.present):
                    if not ok:
                        self._tell(f"-{j}")
                self.done.set()
                return
            self._tell(f"+{i}")
            with self._cond:
                self.left -= 1
                if self.left == 0:
                    self.done.set()

    def _ready_item(self, asks_only: bool) -> bool:
        """Drop queue items already taken; whether one is left for this worker (under _cond)."""
        while self._queue and (self._queue[0][2] in self._taken or self.present[self._queue[0][2]]):
            heapq.heappop(self._queue)
        return bool(self._queue) and (not asks_only or self._queue[0][0] == 0)

    def _fetch(self, i: int) -> None:
        from ..store.chunks import get_chunk

        data = memoryview(get_chunk(self.blobs, self.refs[i], self.entry["digest"]))
        offset = self.starts[i]
        while data:
            n = os.pwrite(self._fd, data, offset)
            data, offset = data[n:], offset + n
        self.present[i] = True

    def _tell(self, line: str) -> None:
        with self._say:
            try:
                if self.proc is not None and self.proc.stdin is not None:
                    self.proc.stdin.write(line + "\n")
                    self.proc.stdin.flush()
            except (OSError, ValueError):
                pass  # it is gone: nothing reads through it any more

    # --- ending ----------------------------------------------------------------------

    def finish(self, timeout: float) -> None:
        """Wait for every chunk, then put the image file in place under the mount and
        stop serving it (see the module). Raises when a chunk could not be fetched."""
        self.fetch_the_rest()
        if not self.done.wait(timeout):
            self.error = self.error or SnapbuildError(
                f"tree image {self.path.name} was not complete after {timeout:g} s",
                hint=f"set {tools.env_key('lazy-image')} (seconds) to allow it longer")
        if self.error is not None:
            self._teardown(failed=True)
            e = self.error
            raise e if isinstance(e, SnapbuildError) else SnapbuildError(
                f"a chunk of the tree image {self.path.name} could not be fetched: {e}") from None
        try:
            os.fchmod(self._fd, 0o444)  # as an image written out whole
            os.fsync(self._fd)
            os.rename(self.partial, self.path)
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(self._loop_fd, LOOP_CHANGE_FD, fd)
            finally:
                os.close(fd)
        except OSError as e:
            self.path.unlink(missing_ok=True)  # the mount still reads through FUSE: not complete
            self._teardown(failed=True)
            raise SnapbuildError(f"cannot put the tree image {self.path.name} in place: {e}") from None
        self._teardown(failed=False)

    def _teardown(self, failed: bool) -> None:
        """Stop the threads and the FUSE process and unmount its file system; when the
        image ``failed`` to arrive, its partial file goes too. The image's own mount
        stays: once failed, it reads nothing, and with no image file and nobody holding
        the lock it counts as absent (:func:`complete`), so the next restore makes it
        again (the server that used it is stopped by the restore that failed)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        # A fetch under way ends first: it writes to the partial file's descriptor,
        # whose number another file could take once it is closed.
        for t in self._workers:
            t.join(timeout=tools.limit("lazy-image"))
        busy = any(t.is_alive() for t in self._workers)
        if self.proc is not None:
            _unmount_lazy(self.mnt)
            with self._say:
                try:
                    self.proc.stdin.close()  # type: ignore[union-attr]
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._loop_fd, self._fd if not busy else -1):  # (a fetch that hangs keeps its file)
            if fd >= 0:
                os.close(fd)
        self._loop_fd = self._fd = -1
        if failed:
            self.partial.unlink(missing_ok=True)
        else:  # the FUSE process's log says something only when it failed
            layout.lazy_log(self.folder).unlink(missing_ok=True)
        _rmdir(self.mnt)
        with _pending_lock:
            _pending.pop(str(self.folder), None)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # and with it the lock
            self._lock_fd = -1


def clear(folder: Path) -> None:
    """Remove what a fetch as it is read of ``folder``'s image left behind when it was
    cut short (its partial file, its FUSE mount); the image's own mount is the caller's."""
    layout.image_partial(layout.image_file(folder)).unlink(missing_ok=True)
    mnt = layout.lazy_mount_dir(folder)
    _unmount_lazy(mnt)
    _rmdir(mnt)


def _unmount_lazy(mnt: Path) -> None:
    if os.path.ismount(mnt):
        tools.run(["umount", "-l", str(mnt)], what=f"unmount of {mnt}")


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # gone already, or something is still in it


def _losetup(file: Path) -> str:
    r = tools.run(["losetup", "--find", "--show", "--read-only", str(file)], what=f"losetup of {file}",
                  error=Unavailable)
    if r.returncode != 0 or not r.stdout.strip().startswith("/dev/"):
        raise Unavailable(f"no loop device for the tree image {file}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def mount(blobs, entry: dict, path: Path, folder: Path, check) -> None:
    """Mount the image file ``entry`` (to be kept at ``path``) at ``folder`` before its
    bytes are all here; :func:`finish` completes it. ``check(head, size)`` says why the
    file whose first chunk is ``head`` is no image it may mount (None: it is).
    Raises :class:`Unavailable` where this node cannot do it."""
    LazyImage(blobs, entry, path, folder, check).start()


def complete(folder: Path) -> bool:
    """For a folder where a tree image is mounted: whether its image is all there. An
    image another process is still fetching is waited for; one this process is
    fetching counts as there (it completes before this process's restore returns)."""
    if layout.image_file(folder).exists():
        return True
    with _pending_lock:
        if str(folder) in _pending:
            return True
    try:
        fd = os.open(layout.lazy_lock(folder), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # until the process that fetches it is done
    finally:
        os.close(fd)
    return layout.image_file(folder).exists()


def finish(blobs) -> dict | None:
    """Complete every image mounted through ``blobs`` (a store.direct.Direct) as it is
    read; what they took (None when there were none). Raises the first failure, after
    ending them all."""
    images = list(getattr(blobs, "lazy_started", ()))
    if not images:
        return None
    t = time.monotonic()
    first: SnapbuildError | None = None
    for image in images:
        try:
            image.finish(tools.limit("lazy-image"))
        except SnapbuildError as e:
            first = first or e
    blobs.lazy_started.clear()
    if first is not None:
        raise first
    return {"images": len(images), "chunks": sum(len(i.refs) for i in images),
            "chunks_asked": sum(i.asked for i in images), "wait_s": round(time.monotonic() - t, 4)}


def abort(blobs) -> None:
    """Stop fetching the images mounted through ``blobs`` (a restore that failed): their
    mounts count as absent from then on, and a later restore makes them again."""
    for image in list(getattr(blobs, "lazy_started", ())):
        image._teardown(failed=True)
    if hasattr(blobs, "lazy_started"):
        blobs.lazy_started.clear()
