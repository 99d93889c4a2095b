"""Every read from a registry, a mirror or a remote cache is bounded, in size and in time.

Size: a blob is bounded by its descriptor (the ``size`` the manifest that names it
gives): a body longer than that is cut off and refused, a shorter one refused too.
Documents (manifests, configs, signature payloads, indexes, listings, tokens, error
answers) are bounded by ``DOCUMENT_MAX``, and nothing is read into memory above
``MEMORY_MAX`` (a tree document is the largest thing that is). Blobs that go into a
store stream to a temporary file there while hashed (``BlobStore.receiving``).

Time: each request has a deadline over its whole answer, headers and body:
``ALLOWANCE_S`` plus its size at ``MIN_RATE`` (:func:`deadline_for`). When it passes,
the connection is cut, so a registry that sends one byte every few seconds cannot
hold a read open; such a registry is too slow, not broken, so it is not asked again.
Retries of broken answers stop once ``RETRY_BUDGET_S`` have gone by since the first try.

Encoding: requests ask for ``Accept-Encoding: identity`` and an answer that comes
with any ``Content-Encoding`` is refused: bytes are hashed as they come, never
decompressed (a gzip bomb is 256 KiB on the wire and gigabytes decoded).

The numbers, in one place:
"""

from __future__ import annotations

import hashlib
import heapq
import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from ..errors import IntegrityError, RegistryError

log = logging.getLogger(__name__)

#: manifests, configs, signature payloads, indexes, tag lists, tokens, error answers
#: (the OCI distribution spec has registries accept manifests of at least 4 MiB)
DOCUMENT_MAX = 4 << 20
#: a tree document (a 39,000-file Python environment is 15 MiB of tree), and so the
#: most a blob read into memory may declare
TREE_MAX = 64 << 20
MEMORY_MAX = TREE_MAX
#: a request's deadline: this allowance (connect, auth, the first byte), plus ...
ALLOWANCE_S = 30.0
#: ... its size at this rate (a 4 MiB chunk: 34 s; a 64 MiB tree: 94 s)
MIN_RATE = 1 << 20
#: no retry of a broken answer starts later than this after the first try
RETRY_BUDGET_S = 120.0
#: bytes read from an answer at a time
READ_SIZE = 1 << 20


def deadline_for(size: int) -> float:
    """Seconds a request that moves ``size`` bytes may take, headers and body."""
    return ALLOWANCE_S + size / MIN_RATE


class _Watchdog:
    """One thread that cuts the connections of requests whose deadline has passed."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._thread: threading.Thread | None = None

    def add(self, dl: Deadline) -> None:
        with self._cv:
            heapq.heappush(self._heap, (dl.end, id(dl), dl))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="registry-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    dl = heapq.heappop(self._heap)[2]
                    if not dl.done:
                        dl.cut()
                self._cv.wait(self._heap[0][0] - now if self._heap else None)


_WATCHDOG = _Watchdog()
_current = threading.local()


class Deadline:
    """A deadline over one request. Inside ``with``, the connections this thread's
    request uses are :meth:`watch`-ed: when the deadline passes they are shut down,
    which ends a read blocked on them at once (a socket timeout only bounds the gap
    between two bytes)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.done = False
        self._socks: list[socket.socket] = []
        self.cut_off = False  # its connections were shut down: what they "ended" with is not an answer
        self._lock = threading.Lock()

    def __enter__(self) -> Deadline:
        self._outer = getattr(_current, "deadline", None)
        _current.deadline = self
        _WATCHDOG.add(self)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.done = True
        _current.deadline = self._outer

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._socks.append(sock)
            if self.cut_off:
                _shutdown(sock)

    def cut(self) -> None:
        with self._lock:
            if self.done:
                return
            self.cut_off = True
            for sock in self._socks:
                _shutdown(sock)

    def passed(self) -> bool:
        return self.cut_off or time.monotonic() >= self.end

    def error(self, what: str, got: int | None = None) -> RegistryError:
        part = f" ({got} bytes had come)" if got is not None else ""
        return RegistryError(f"{what}: no complete answer within its deadline of {self.seconds:.0f} s{part}; "
                             "the registry is too slow, or stalls on purpose",
                             hint=f"a request may take {ALLOWANCE_S:.0f} s plus its size at "
                                  f"{MIN_RATE >> 10} KiB/s; check the registry and the network to it")


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def current() -> Deadline | None:
    """The deadline of the request this thread is making, if any."""
    return getattr(_current, "deadline", None)


def watch(sock: socket.socket | None) -> None:
    """Let the current request's deadline cut ``sock`` (nothing outside a request)."""
    dl = current()
    if dl is not None:
        dl.watch(sock)


class Sink:
    """Where an answer's bytes go as they arrive: counted against their bound, hashed,
    and written to ``into`` (a file, rewound for each try) or kept in memory.

    ``size``: the exact length the descriptor gives (a body of any other length is
    refused); without one, at most ``limit`` bytes (a document)."""

    def __init__(self, what: str, *, size: int | None = None, limit: int = DOCUMENT_MAX,
                 into: BinaryIO | None = None) -> None:
        self.what = what
        self.size = size
        self.limit = size if size is not None else limit
        if into is None and self.limit > MEMORY_MAX:
            raise IntegrityError(f"{what}: its descriptor says {self.limit} bytes, more than anything read into "
                                 f"memory may hold ({MEMORY_MAX}); refused",
                                 hint="the manifest is corrupt or hostile: do not use it")
        self.into = into
        self.start()

    def start(self) -> None:
        """Begin a (new) try: forget what an earlier one wrote."""
        self.count = 0
        self._hash = hashlib.sha256()
        if self.into is None:
            self._buf = io.BytesIO()
        else:
            self.into.seek(0)
            self.into.truncate()

    def expect(self, length: str | int | None) -> None:
        """Refuse at once an answer whose Content-Length cannot be right."""
        try:
            n = int(length) if length is not None else None
        except ValueError:
            return
        if n is not None and (n > self.limit or (self.size is not None and n != self.size)):
            bound = (f"its descriptor gives {self.size}" if self.size is not None
                     else f"a document may hold at most {self.limit}")
            raise IntegrityError(f"{self.what}: the answer says it holds {n} bytes, where {bound}; refused",
                                 hint=_HINT)

    def refuse_encoding(self, encoding: str | None) -> None:
        """Bytes are hashed as they come: an encoded answer is refused, never decoded."""
        if encoding and encoding.strip().lower() not in ("identity", ""):
            raise IntegrityError(f"{self.what}: the answer comes {encoding}-encoded (Content-Encoding), "
                                 "where identity was asked for; refused", hint=_HINT)

    def write(self, data: bytes) -> None:
        self.count += len(data)
        if self.count > self.limit:
            bound = (f"the {self.size} bytes its descriptor gives" if self.size is not None
                     else f"{self.limit} bytes, the most a document may hold")
            raise IntegrityError(f"{self.what}: the answer goes on past {bound}; cut off and refused", hint=_HINT)
        self._hash.update(data)
        (self._buf if self.into is None else self.into).write(data)

    def take(self, read: Callable[[int], bytes], *, length: str | int | None = None,
             encoding: str | None = None) -> None:
        """One try: check the answer's Content-Length and -Encoding, then copy it."""
        self.start()
        self.refuse_encoding(encoding)
        self.expect(length)
        self.pump(read)

    def pump(self, read: Callable[[int], bytes]) -> None:
        """Copy ``read(n)`` until it returns nothing, within the current request's deadline."""
        dl = current()
        while data := read(READ_SIZE):
            self.write(data)
            if dl is not None and dl.passed():
                raise dl.error(self.what, self.count)
        if dl is not None and dl.cut_off:
            raise dl.error(self.what, self.count)
        if self.size is not None and self.count != self.size:
            raise Short(f"{self.what}: the answer ended after {self.count} of the {self.size} bytes "
                         "its descriptor gives")

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def value(self) -> bytes:
        """What was read (b'' when it went to ``into``)."""
        return self._buf.getvalue() if self.into is None else b""


_HINT = "the registry (or something between it and here) sends what it should not: do not use it"


class Short(Exception):
    """An answer that ended early: a broken connection, worth another try."""


def read_verified(read: Callable[[Sink], None], sink: Sink, digest: str, where: str, *, attempts: int = 2) -> bytes:
    """``read(sink)`` the blob (it calls ``sink.take``, which starts afresh); bytes that
    do not hash to ``digest`` are read again (``attempts`` times in all), then refused:
    a registry never hands out unverified bytes. Returns them (b'' where they went to
    a file)."""
    got = ""
    for i in range(attempts):
        read(sink)
        got = sink.digest
        if got == digest:
            return sink.value()
        if i < attempts - 1:
            log.warning("blob %s in %s hashes to %s: fetching it again", digest, where, got)
    times = "twice" if attempts == 2 else "once" if attempts == 1 else f"{attempts} times"
    raise IntegrityError(f"blob {digest} in {where} is corrupt: its content hashes to {got} (fetched {times})",
                         hint="push the snapshot to the registry again to repair it")


class Sizes(dict):
    """digest -> size, from the descriptors of the manifests a registry client handed
    out (or was shown, :func:`remember`): a blob read without an explicit size is
    bounded by its descriptor's, else by ``DOCUMENT_MAX``."""

    def note(self, manifest: object) -> None:
        if not isinstance(manifest, dict):
            return
        for desc in [manifest.get("config"), *(manifest.get("layers") or [])]:
            if isinstance(desc, dict) and isinstance(desc.get("digest"), str):
                size = desc.get("size")
                if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
                    self[desc["digest"]] = size

    def note_bytes(self, data: bytes) -> None:
        import json

        try:
            self.note(json.loads(data))
        except ValueError:
            pass  # not a manifest: whoever parses it says so


def remember(reg: object, manifest: dict) -> None:
    """Tell ``reg`` the sizes ``manifest`` gives its blobs (a manifest read from a store,
    say): later reads of them by digest alone are bounded by those."""
    sizes = getattr(reg, "sizes", None)
    if isinstance(sizes, Sizes):
        sizes.note(manifest)
