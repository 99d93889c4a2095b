"""Bounded registry reads (registry/bounds.py): sizes by descriptor or document cap,
encodings refused, deadlines that cut a stalled connection, retries bounded in time;
the file:// registry's checks before reading; zstd frames checked before decompressing;
blobs received into a store through a temp file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading

import pytest
import zstandard

from snapbuild.errors import IntegrityError, RegistryError
from snapbuild.registry import bounds
from snapbuild.registry.base import retrying
from snapbuild.registry.bounds import DOCUMENT_MAX, Deadline, Short, Sink, read_verified
from snapbuild.registry.file import FileRegistry
from snapbuild.registry.transfer import descriptor_sizes
from snapbuild.store.blobs import BlobStore, digest_bytes
from snapbuild.store.chunks import CHUNK_SIZE, MEDIA_TYPES, get_chunk


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- sizes and encodings ----------------------------------------------------------------

def test_a_body_longer_than_its_descriptor_is_cut_off():
    sink = Sink("blob X in oci://r/n", size=10)
    with pytest.raises(IntegrityError, match="goes on past the 10 bytes its descriptor gives; cut off"):
        sink.take(io.BytesIO(b"x" * 10_000_000).read)
    assert sink.count <= 10 + bounds.READ_SIZE, "it stopped reading"


def test_a_body_shorter_than_its_descriptor_is_a_broken_answer():
    with pytest.raises(Short, match="ended after 3 of the 10 bytes"):
        Sink("blob X", size=10).take(io.BytesIO(b"abc").read)


def test_a_content_length_that_cannot_be_right_is_refused_before_reading():
    read = io.BytesIO(b"").read
    with pytest.raises(IntegrityError, match="says it holds 11 bytes, where its descriptor gives 10"):
        Sink("blob X", size=10).take(read, length="11")
    with pytest.raises(IntegrityError, match=f"where a document may hold at most {DOCUMENT_MAX}"):
        Sink("manifest X").take(read, length=str(DOCUMENT_MAX + 1))


def test_a_document_is_bounded_by_the_cap():
    sink = Sink("manifest X")
    with pytest.raises(IntegrityError, match="the most a document may hold"):
        sink.take(io.BytesIO(bytes(DOCUMENT_MAX + 1)).read)
    sink.take(io.BytesIO(b"{}").read)
    assert sink.value() == b"{}" and sink.digest == sha(b"{}")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_an_encoded_answer_is_refused_never_decoded(encoding):
    with pytest.raises(IntegrityError, match=f"comes {encoding}-encoded"):
        Sink("blob X", size=3).take(io.BytesIO(b"abc").read, encoding=encoding)
    Sink("blob X", size=3).take(io.BytesIO(b"abc").read, encoding="identity")


def test_nothing_above_memory_max_is_read_into_memory_but_a_file_may_take_it(tmp_path):
    with pytest.raises(IntegrityError, match="more than anything read into memory may hold"):
        Sink("blob X", size=bounds.MEMORY_MAX + 1)
    with open(tmp_path / "f", "w+b") as f:
        Sink("blob X", size=bounds.MEMORY_MAX + 1, into=f)


def test_a_blob_streamed_into_a_file_is_rewound_for_a_second_try(tmp_path):
    data = b"the real bytes"
    answers = iter([b"garbage bytes!", data])
    with open(tmp_path / "f", "w+b") as f:
        sink = Sink("blob X", size=len(data), into=f)
        out = read_verified(lambda s: s.take(io.BytesIO(next(answers)).read), sink, sha(data), "r")
        assert out == b""
        f.seek(0)
        assert f.read() == data


# -- time -------------------------------------------------------------------------------

def test_a_deadline_cuts_a_read_that_a_drip_keeps_alive():
    """A peer sends a byte every 0.2 s, forever; the socket timeout (2 s) never fires.
    The deadline (1 s) shuts the socket down and the read ends."""
    a, b = socket.socketpair()
    a.settimeout(2)
    stop = threading.Event()

    def drip():
        while not stop.wait(0.2):
            try:
                b.send(b"x")
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    sink = Sink("blob X in oci://r/n", size=1000)
    done = threading.Event()
    errors: list[Exception] = []

    def read():
        try:
            with Deadline(1.0) as dl:
                dl.watch(a)
                sink.take(lambda n: a.recv(1))
        except Exception as e:  # noqa: BLE001 - what the reader sees, checked below
            errors.append(e)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert done.wait(15), "the read was not cut off"
    finally:
        stop.set()
        a.close()
        b.close()
    assert isinstance(errors[0], RegistryError) and "within its deadline of 1 s" in errors[0].message
    assert 0 < sink.count < 1000


def test_the_deadline_grows_with_the_size():
    assert bounds.deadline_for(0) == bounds.ALLOWANCE_S
    assert bounds.deadline_for(bounds.MIN_RATE * 10) == bounds.ALLOWANCE_S + 10


def test_retries_stop_when_their_time_is_spent():
    calls = []

    def broken():
        calls.append(1)
        raise OSError("connection reset")

    with pytest.raises(RegistryError, match="connection reset"):
        retrying(broken, "fetching", attempts=50, base_delay=0.05, budget_s=0.5)
    assert 1 < len(calls) < 50


# -- file:// ----------------------------------------------------------------------------

@pytest.fixture
def file_registry(tmp_path):
    reg = FileRegistry(tmp_path / "reg")
    src = BlobStore(tmp_path / "src")
    return reg, src


def _publish(reg, src, data: bytes) -> str:
    d = src.put(data)
    reg.put_blob("demo", d, src.path(d))
    return d


def test_a_fifo_planted_as_a_blob_is_refused_without_waiting(file_registry):
    reg, _ = file_registry
    d = sha(b"anything")
    path = reg.blob_path("demo", d)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with pytest.raises(IntegrityError, match="is not a regular file"):
        reg.get_blob("demo", d, size=8)


def test_a_file_blob_is_checked_against_its_descriptor_before_it_is_read(file_registry):
    reg, src = file_registry
    d = _publish(reg, src, b"x" * 100)
    with pytest.raises(IntegrityError, match="says it holds 100 bytes, where its descriptor gives 10"):
        reg.get_blob("demo", d, size=10)
    assert reg.get_blob("demo", d, size=100) == b"x" * 100


def test_a_blob_read_by_digest_alone_is_bounded_by_what_its_manifest_said(file_registry):
    reg, src = file_registry
    big = _publish(reg, src, bytes(DOCUMENT_MAX + 1))
    with pytest.raises(IntegrityError, match="a document may hold at most"):
        reg.get_blob("demo", big)
    manifest = json.dumps({"config": {"digest": big, "size": DOCUMENT_MAX + 1}, "layers": []}).encode()
    m = _publish(reg, src, manifest)
    reg.get_manifest("demo", m)
    assert len(reg.get_blob("demo", big)) == DOCUMENT_MAX + 1


# -- what a manifest may declare ----------------------------------------------------------

def test_a_manifest_that_gives_a_chunk_more_than_a_chunk_holds_is_refused():
    layer = {"mediaType": MEDIA_TYPES["raw"], "digest": sha(b"c"), "size": CHUNK_SIZE + 1}
    manifest = {"config": {"digest": sha(b"{}"), "size": 2}, "layers": [layer]}
    with pytest.raises(IntegrityError, match=r"more than such a blob can hold \(4194304\); refused"):
        descriptor_sizes(manifest, "manifest M in oci://r/n")
    layer["size"] = CHUNK_SIZE
    assert descriptor_sizes(manifest, "m") == {sha(b"{}"): 2, sha(b"c"): CHUNK_SIZE}
    manifest["config"]["size"] = "2"
    with pytest.raises(IntegrityError, match="its config gives a size of '2'"):
        descriptor_sizes(manifest, "m")


# -- zstd -------------------------------------------------------------------------------

def test_a_zstd_frame_that_declares_more_than_the_chunk_is_refused_before_decompressing(tmp_path):
    blobs = BlobStore(tmp_path)
    c = zstandard.ZstdCompressor().compressobj(size=1 << 30)
    frame = b"".join(c.compress(bytes(1 << 20)) for _ in range(1024)) + c.flush()
    ref = {"enc": "zstd", "digest": blobs.put(frame), "size": 4096}
    with pytest.raises(IntegrityError, match=f"its zstd frame declares {1 << 30} bytes, where the tree records 4096"):
        get_chunk(blobs, ref)


def test_a_zstd_frame_without_a_content_size_is_bounded_by_the_chunk_s(tmp_path):
    blobs = BlobStore(tmp_path)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    with pytest.raises(IntegrityError, match="does not decompress"):
        get_chunk(blobs, {"enc": "zstd", "digest": blobs.put(frame), "size": 4096})
    good = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 4096)
    assert get_chunk(blobs, {"enc": "zstd", "digest": blobs.put(good), "size": 4096}) == b"a" * 4096


# -- into a store -------------------------------------------------------------------------

def test_a_blob_is_received_into_the_store_only_when_its_writer_finished(tmp_path):
    blobs = BlobStore(tmp_path)
    d = digest_bytes(b"hello")
    with pytest.raises(IntegrityError):
        with blobs.receiving(d) as f:
            f.write(b"hel")
            raise IntegrityError("cut off")
    assert not blobs.has(d) and not any(blobs.tmp_dir.iterdir()), "nothing half-written stays"
    with blobs.receiving(d) as f:
        f.write(b"hello")
    assert blobs.get(d) == b"hello"
