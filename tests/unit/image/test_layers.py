"""Normalized layers: the same content gives the same bytes; unsafe entries are refused."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from snapbuild.image.layers import ImageError, normalize, read_archive, write_docker_archive


def tar_of(entries, *, mtime=1_700_000_000, owner="someone") -> io.BytesIO:
    """(name, kind, payload) entries, in the order given, with the given time and owner name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.uname, info.gname = mtime, owner, owner
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "link": tarfile.LNKTYPE, "sym": tarfile.SYMTYPE,
                         "chr": tarfile.CHRTYPE}[kind]
            info.linkname = payload or ""
            tar.addfile(info)
    buf.seek(0)
    return buf


ENTRIES = [("app", "dir", None), ("app/b.txt", "file", b"bee"), ("app/a.txt", "file", b"ay"),
           ("app/link", "sym", "a.txt")]


def test_same_content_same_digest_whatever_the_order_time_and_owner_names(tmp_path):
    one = normalize(tar_of(ENTRIES), tmp_path / "1.tar", epoch=1000)
    two = normalize(tar_of(list(reversed(ENTRIES)), mtime=1_800_000_000, owner="other"), tmp_path / "2.tar",
                    epoch=1000)
    assert one.digest == two.digest and (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    with tarfile.open(tmp_path / "1.tar") as t:
        members = t.getmembers()
    assert [m.name for m in members] == ["app", "app/a.txt", "app/b.txt", "app/link"]
    assert {m.mtime for m in members} == {1000} and {m.uname for m in members} == {""}
    assert normalize(tar_of(ENTRIES), tmp_path / "3.tar", epoch=None).digest != one.digest, "times count"


def test_hard_links_come_after_the_file_they_share(tmp_path):
    # "z" holds the data and "a" links to it; sorted, "a" comes first, so "a" must hold it.
    layer = normalize(tar_of([("z", "file", b"data"), ("a", "link", "z")]), tmp_path / "l.tar", epoch=0)
    with tarfile.open(layer.path) as t:
        a, z = t.getmember("a"), t.getmember("z")
        assert a.isreg() and t.extractfile(a).read() == b"data"
        assert z.islnk() and z.linkname == "a"


def test_device_nodes_are_left_out_and_counted(tmp_path):
    layer = normalize(tar_of([("dev", "dir", None), ("dev/null", "chr", None), ("x", "file", b"1")]),
                      tmp_path / "l.tar", epoch=0)
    assert layer.dropped_devices == 1
    with tarfile.open(layer.path) as t:
        assert t.getnames() == ["dev", "x"]


@pytest.mark.parametrize("entries", [[("../evil", "file", b"x")], [("a/../../evil", "file", b"x")],
                                     [("x", "file", b"1"), ("y", "link", "../../etc/passwd")]])
def test_entries_outside_the_root_are_refused(tmp_path, entries):
    with pytest.raises(ImageError, match="points outside the root filesystem"):
        normalize(tar_of(entries), tmp_path / "l.tar", epoch=0, what="test layer")


def test_compressed_layers_are_read(tmp_path):
    import gzip

    plain = normalize(tar_of(ENTRIES), tmp_path / "1.tar", epoch=0)
    gz = normalize(io.BytesIO(gzip.compress(tar_of(ENTRIES).getvalue())), tmp_path / "2.tar", epoch=0)
    assert gz.digest == plain.digest


def test_docker_archive_round_trip(tmp_path):
    layer = normalize(tar_of(ENTRIES), tmp_path / "l.tar", epoch=0)
    config = {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
              "rootfs": {"type": "layers", "diff_ids": [layer.digest]}}
    with open(tmp_path / "img.tar", "wb") as f:
        write_docker_archive(f, config, [layer], "x:y")
    with read_archive(tmp_path / "img.tar", "docker-archive") as (got, streams):
        assert got == config
        [(_, stream)] = streams
        assert stream.read() == layer.path.read_bytes()
    with tarfile.open(tmp_path / "img.tar") as t:
        assert json.loads(t.extractfile("manifest.json").read())[0]["RepoTags"] == ["x:y"]


def test_unreadable_archive_is_a_clear_error(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    with pytest.raises(ImageError, match="cannot read it as an image archive"):
        with read_archive(tmp_path / "bad.tar", "docker-archive"):
            pass
