"""The FUSE half of a lazily fetched tree image (see :mod:`.lazyimage`): a read-only
file system holding one file, ``tree.erofs``, whose bytes are those of a partly
written local file. A read of a piece that is not there yet asks the runner for it
and waits; the runner fetches it, verifies it, writes it into the local file and says
so. This process never touches the network nor decides what is trusted: it only
serves bytes the runner has already verified.

Run as ``python -m snapbuild.runtime.lazyfs PARTIAL MOUNTPOINT``, it talks to the
runner over its standard streams, one line at a time:

- in, first: ``{"sizes": [chunk sizes], "present": [indexes already in PARTIAL]}``;
- in, then: ``+N`` (chunk N is in place) or ``-N`` (chunk N could not be fetched:
  reads of it fail with EIO);
- out: ``ready`` once mounted, then ``N`` for each chunk a read waits for (once).

End of input means the runner is done with it, or gone: it unmounts and exits.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import threading

NAME = "tree.erofs"


class Chunks:
    """Which chunks of the file are in place, and the waits for those that are not."""

    def __init__(self, sizes: list[int], present: list[int], ask) -> None:
        self.starts = [0]
        for size in sizes:
            self.starts.append(self.starts[-1] + size)
        self.state: list[bool | None] = [None] * len(sizes)  # None: missing; True: in place; False: failed
        for i in present:
            self.state[i] = True
        self._asked: set[int] = set()
        self._ask = ask
        self._cond = threading.Condition()

    @property
    def size(self) -> int:
        return self.starts[-1]

    def covering(self, offset: int, length: int) -> range:
        import bisect

        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_left(self.starts, min(offset + length, self.size)) - 1
        return range(max(first, 0), max(last, first) + 1)

    def settle(self, i: int, ok: bool) -> None:
        with self._cond:
            self.state[i] = ok
            self._cond.notify_all()

    def wait(self, chunks: range) -> bool:
        """Wait for ``chunks`` to be in place; False when one of them failed."""
        with self._cond:
            for i in chunks:
                if self.state[i] is None and i not in self._asked:
                    self._asked.add(i)
                    self._ask(i)
            while any(self.state[i] is None for i in chunks):
                self._cond.wait()
            return all(self.state[i] for i in chunks)


def _serve(partial: str, mountpoint: str) -> None:
    import mfusepy

    header = json.loads(sys.stdin.readline())
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    chunks = Chunks(header["sizes"], header["present"], lambda i: say(str(i)))
    fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)

    def listen() -> None:
        for line in sys.stdin:
            line = line.strip()
            if line[:1] in ("+", "-") and line[1:].isdigit():
                chunks.settle(int(line[1:]), line[0] == "+")
        # the runner is done, or gone: nothing more will arrive
        subprocess.run(["umount", "-l", mountpoint], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os._exit(0)

    class Image(mfusepy.Operations):
        use_ns = True

        def init(self, path):
            say("ready")

        def getattr(self, path, fh=None):
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
            if path == "/" + NAME:
                return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": chunks.size}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path, fh):
            return [".", "..", NAME]

        def open(self, path, flags):
            if path != "/" + NAME:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise mfusepy.FuseOSError(errno.EROFS)
            return 0

        def read(self, path, size, offset, fh):
            if offset >= chunks.size:
                return b""
            if not chunks.wait(chunks.covering(offset, size)):
                raise mfusepy.FuseOSError(errno.EIO)
            return os.pread(fd, min(size, chunks.size - offset), offset)

    threading.Thread(target=listen, name="runner", daemon=True).start()
    mfusepy.FUSE(Image(), mountpoint, foreground=True, ro=True, fsname="snapbuild-lazy", kernel_cache=True,
                 default_permissions=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
