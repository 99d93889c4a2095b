"""The FUSE side of a tree image fetched as read (runtime.lazyfs): which chunks a read
covers, each asked for once, and a read that waits ends with its chunks in place, or
failing when one of them failed."""

from __future__ import annotations

import threading

from snapbuild.runtime.lazyfs import Chunks


def test_a_read_covers_the_chunks_its_bytes_lie_in():
    c = Chunks([4, 4, 2], [], lambda i: None)
    assert c.size == 10
    assert list(c.covering(0, 4)) == [0]
    assert list(c.covering(3, 2)) == [0, 1]
    assert list(c.covering(4, 4)) == [1]
    assert list(c.covering(0, 10)) == [0, 1, 2]
    assert list(c.covering(9, 100)) == [2], "a read past the end covers the last chunk only"


def test_a_chunk_is_asked_for_once_and_a_read_waits_for_it():
    asked: list[int] = []
    c = Chunks([4, 4, 2], [0], asked.append)
    assert c.wait(c.covering(0, 4)) and asked == [], "a chunk in place is not asked for"
    results: list[bool] = []
    readers = [threading.Thread(target=lambda: results.append(c.wait(c.covering(2, 6)))) for _ in range(3)]
    for t in readers:
        t.start()
    while not asked:
        threading.Event().wait(0.01)
    c.settle(1, True)
    for t in readers:
        t.join(5)
    assert asked == [1] and results == [True, True, True]


def test_a_read_of_a_chunk_that_failed_fails():
    c = Chunks([4, 4], [0], lambda i: None)
    c.settle(1, False)
    assert c.wait(c.covering(0, 8)) is False
    assert c.wait(c.covering(0, 4)) is True
