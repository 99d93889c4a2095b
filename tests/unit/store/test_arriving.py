"""store.arriving: reads that wait for a pull to bring their blob."""

from __future__ import annotations

import threading
import time

import pytest

from snapbuild.errors import NotFound
from snapbuild.store.arriving import Arriving, PullFailed
from snapbuild.store.blobs import BlobStore, digest_bytes


@pytest.fixture
def blobs(tmp_path) -> BlobStore:
    return BlobStore(tmp_path, tmp_path / "tmp")


def later(fn, delay: float = 0.1) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), fn()))
    t.start()
    return t


def test_a_read_waits_for_its_blob_and_gets_it_verified(blobs):
    view = Arriving(blobs)
    data = b"a chunk of a checkpoint image"
    d = digest_bytes(data)
    t = later(lambda: (blobs.put(data), view.arrived(d)))
    assert view.get(d) == data and view.waits == 1
    assert view.read_range(d, 2, 5) == data[2:7]
    t.join()
    assert view.has(d) and view.root == blobs.root, "everything else is the store's own"


def test_a_blob_the_pull_did_not_bring_is_not_found_once_it_ends(blobs):
    view = Arriving(blobs)
    t = later(view.finish)
    with pytest.raises(NotFound):
        view.get("sha256:" + "0" * 64)
    t.join()


def test_waiting_readers_fail_with_the_pulls_error(blobs):
    view = Arriving(blobs)
    t = later(lambda: view.finish(OSError("connection reset by peer")))
    with pytest.raises(PullFailed, match="did not arrive: the pull stopped \\(connection reset by peer\\)"):
        view.get("sha256:" + "1" * 64)
    t.join()
