"""The port forwarder's connection to a server: an attempt that goes unanswered (CRIU
drops a restoring container's packets, and the kernel would send the SYN again only
after a second) is tried again at once; a refusal is final. Real sockets on
127.0.0.1, with a spy on the attempts."""

from __future__ import annotations

import socket
import threading

import pytest

from snapbuild.runtime import portfwd


def fill(address) -> list[socket.socket]:
    """Connections that fill a listener's accept queue (none accepted): from then on
    the kernel drops further SYNs to it, as CRIU's network lock does."""
    queued = []
    for _ in range(16):
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect(address)
        except TimeoutError:
            s.close()
            return queued
        queued.append(s)
    raise AssertionError("the accept queue never filled")


@pytest.fixture
def attempts(monkeypatch):
    made: list[tuple] = []
    real = socket.create_connection

    def spy(address, timeout=None, *args, **kw):
        made.append((address, timeout))
        return real(address, timeout, *args, **kw)

    monkeypatch.setattr(socket, "create_connection", spy)
    return made


@pytest.fixture
def unanswered():
    """The address of a listener whose accept queue is full: the kernel drops SYNs to
    it, as CRIU's network lock does; and the listener, to accept what is queued."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    queued = fill(server.getsockname())
    yield server, queued
    for s in queued:
        s.close()
    server.close()


def test_an_unanswered_attempt_is_tried_again_until_the_server_answers(attempts, unanswered):
    server, queued = unanswered
    address = server.getsockname()
    attempts.clear()
    freed = threading.Timer(0.3, lambda: [server.accept()[0].close() for _ in queued])
    freed.start()
    try:
        conn = portfwd.connect(address)
        try:
            assert conn.getpeername() == address and conn.gettimeout() is None
        finally:
            conn.close()
        assert len(attempts) > 1, "the first attempt went unanswered and was made again"
        assert all(t == portfwd.CONNECT_TRY_S for _, t in attempts)
    finally:
        freed.join()


def test_a_refusal_is_final_at_once(attempts):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    address = s.getsockname()
    s.close()  # nothing listens there
    with pytest.raises(ConnectionRefusedError):
        portfwd.connect(address)
    assert len(attempts) == 1


def test_attempts_stop_at_the_deadline(monkeypatch, attempts, unanswered):
    server, _ = unanswered
    attempts.clear()
    monkeypatch.setattr(portfwd, "CONNECT_FOR_S", 0.2)
    with pytest.raises(TimeoutError):
        portfwd.connect(server.getsockname())
    assert len(attempts) >= 2
