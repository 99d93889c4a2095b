"""Root filesystems from OCI layers: unsafe layers are refused, whiteouts applied,
and overlay and copy assembly give the same tree."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest

from snapbuild.rootfs import UnsafeLayer, assemble, cached_layer, copy_assemble, unpack


def layer(*entries) -> io.BytesIO:
    """A tar layer from (name, kind, payload) entries: file/dir/symlink/hardlink/chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE}[kind]
            info.mode = 0o755 if kind == "dir" else 0o644
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            tar.addfile(info)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("entries, words", [
    ([("../evil", "file", b"x")], "outside the root"),
    ([("/etc/passwd", "file", b"x")], "outside the root"),
    ([("a/../../evil", "file", b"x")], "outside the root"),
    ([("lib", "symlink", "/tmp"), ("lib/evil", "file", b"x")], "through a symlink"),
    ([("up", "symlink", "../.."), ("up/evil", "file", b"x")], "through a symlink"),
    ([("hl", "hardlink", "/etc/shadow")], "outside the root"),
    ([("hl", "hardlink", "nothere")], "does not name a file of this layer"),
    ([("dev", "chr", "")], "device node"),
])
def test_unsafe_layers_are_refused(tmp_path, entries, words):
    with pytest.raises(UnsafeLayer, match=words) as info:
        unpack(layer(*entries), tmp_path / "root", layer="sha256:abc")
    assert "sha256:abc" in str(info.value)
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_symlinks_may_point_anywhere_inside_the_container(tmp_path):
    unpack(layer(("usr/bin/python3.11", "file", b"#!"), ("usr/bin/python3", "symlink", "/usr/bin/python3.11"),
                 ("same", "hardlink", "usr/bin/python3.11")), tmp_path / "root")
    assert os.readlink(tmp_path / "root/usr/bin/python3") == "/usr/bin/python3.11"
    assert os.stat(tmp_path / "root/same").st_ino == os.stat(tmp_path / "root/usr/bin/python3.11").st_ino


def build_layers(tmp_path):
    base = layer(("etc", "dir", None), ("etc/keep", "file", b"keep"), ("etc/drop", "file", b"drop"),
                 ("app", "dir", None), ("app/old.py", "file", b"old"), ("app/sub", "dir", None),
                 ("app/sub/x", "file", b"x"))
    top = layer(("etc/.wh.drop", "file", b""), ("app/.wh..wh..opq", "file", b""), ("app/new.py", "file", b"new"),
                ("etc/added", "file", b"added"))
    cache = tmp_path / "cache"
    return [cached_layer(f"sha256:{i:064x}", lambda s=s: s, cache) for i, s in enumerate([base, top], 1)]


def tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


EXPECTED = {"etc/keep": b"keep", "etc/added": b"added", "app/new.py": b"new"}


def test_copy_assembly_applies_whiteouts_and_opaque_folders(tmp_path):
    layers = build_layers(tmp_path)
    copy_assemble(layers, tmp_path / "rootfs")
    assert tree(tmp_path / "rootfs") == EXPECTED


def test_overlay_assembly_matches_the_copy(tmp_path):
    assert os.geteuid() == 0, "overlay mounts need root (CI runs as root)"
    layers = build_layers(tmp_path)
    target = tmp_path / "mnt"
    assert assemble(layers, target, work=tmp_path / "ov") == "overlay"
    try:
        assert tree(target) == EXPECTED
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_layers_are_unpacked_once(tmp_path):
    calls = []

    def opener():
        calls.append(1)
        return layer(("f", "file", b"1"))

    a = cached_layer("sha256:" + "a" * 64, opener, tmp_path / "cache")
    b = cached_layer("sha256:" + "a" * 64, opener, tmp_path / "cache")
    assert a == b and len(calls) == 1 and (a / "f").read_bytes() == b"1"


def test_cached_layers_record_their_users_and_go_with_the_last(tmp_path):
    from snapbuild.rootfs import release_layer

    cache, hexpart = tmp_path / "cache", "b" * 64
    one, two = tmp_path / "store-1", tmp_path / "store-2"
    one.mkdir()
    two.mkdir()
    cached_layer("sha256:" + hexpart, lambda: layer(("f", "file", b"1")), cache, user=str(one))
    cached_layer("sha256:" + hexpart, lambda: pytest.fail("unpacked twice"), cache, user=str(two))
    assert release_layer(cache, hexpart, str(tmp_path / "stranger")) is None
    assert release_layer(cache, hexpart, str(one)) is False and (cache / hexpart / "f").exists()
    assert release_layer(cache, hexpart, str(two), dry_run=True) is True and (cache / hexpart).exists()
    assert release_layer(cache, hexpart, str(two)) is True and not (cache / hexpart).exists()


def _mode_layer(name: str, mode: int, is_dir: bool = False) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.mode = mode
        if is_dir:
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        else:
            info.size = 2
            tar.addfile(info, io.BytesIO(b"#!"))
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name", ["a/.wh..", "a/.wh...", "a/.wh.", "a/.wh..wh.x"])
def test_whiteouts_of_anything_but_a_plain_name_are_refused(tmp_path, name):
    """`.wh...` would whiteout `..`: removing the folder above the layer's parent."""
    outside = tmp_path / "root" / "keep.txt"
    outside.parent.mkdir()
    outside.write_text("keep")
    with pytest.raises(UnsafeLayer, match="does not name an entry"):
        unpack(layer(("a/", "dir", None), (name, "file", b"")), tmp_path / "root" / "layer")
    assert outside.read_text() == "keep"


def test_setuid_and_setgid_bits_are_dropped_sticky_on_folders_kept(tmp_path):
    unpack(_mode_layer("su", 0o4755), tmp_path / "r1")
    unpack(_mode_layer("sg", 0o2755), tmp_path / "r2")
    unpack(_mode_layer("tmp", 0o1777, is_dir=True), tmp_path / "r3")
    assert os.stat(tmp_path / "r1/su").st_mode & 0o7777 == 0o755
    assert os.stat(tmp_path / "r2/sg").st_mode & 0o7777 == 0o755
    assert os.stat(tmp_path / "r3/tmp").st_mode & 0o7777 == 0o1777


def test_a_folder_replaced_by_a_symlink_is_not_written_through(tmp_path):
    """The layer makes `a/` a folder, then a symlink to the outside, then writes `a/x`."""
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(UnsafeLayer, match="through a symlink"):
        unpack(layer(("a/", "dir", None), ("a/ok", "file", b"1"), ("a", "symlink", str(outside)),
                     ("a/x", "file", b"pwned")), tmp_path / "root")
    assert list(outside.iterdir()) == []


def test_copy_assembly_replaces_a_lower_symlink_instead_of_following_it(tmp_path):
    """A lower layer's `etc2 -> OUTSIDE`, an upper layer's real folder `etc2/` with a
    file: copy assembly must not write the file into OUTSIDE."""
    outside = tmp_path / "outside"
    outside.mkdir()
    low, up = tmp_path / "low", tmp_path / "up"
    unpack(layer(("etc2", "symlink", str(outside))), low)
    unpack(layer(("etc2/", "dir", None), ("etc2/passwd", "file", b"pwned")), up)
    copy_assemble([low, up], tmp_path / "root")
    assert list(outside.iterdir()) == []
    assert (tmp_path / "root/etc2/passwd").read_bytes() == b"pwned"
    assert not (tmp_path / "root/etc2").is_symlink()


def test_a_layer_named_by_anything_but_a_digest_is_refused(tmp_path):
    """The name becomes a folder of the layer cache: `sha256:../../x` must not."""
    for bad in ("sha256:../../x", "sha256:" + "A" * 64, "md5:abc"):
        with pytest.raises(UnsafeLayer, match="not named by a sha256 digest"):
            cached_layer(bad, lambda: layer(("f", "file", b"x")), tmp_path / "cache")
    assert not (tmp_path / "x").exists()


# cap_net_raw+ep, as `setcap cap_net_raw+ep` writes it (VFS_CAP_REVISION_2, 20 bytes)
CAP_NET_RAW = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


def _xattr_layer(pax: dict) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("bin/ping")
        info.size, info.mode, info.pax_headers = 2, 0o755, pax
        tar.addfile(info, io.BytesIO(b"#!"))
    buf.seek(0)
    return buf


def test_file_capabilities_and_user_xattrs_are_restored(tmp_path):
    import base64

    raw = CAP_NET_RAW.decode("utf-8", "surrogateescape")
    unpack(_xattr_layer({"SCHILY.xattr.security.capability": raw, "SCHILY.xattr.user.origin": "debian",
                         "SCHILY.xattr.security.selinux": "system_u"}), tmp_path / "a")
    assert os.getxattr(tmp_path / "a/bin/ping", "security.capability") == CAP_NET_RAW
    assert os.getxattr(tmp_path / "a/bin/ping", "user.origin") == b"debian"
    if "security.selinux" in os.listxattr(tmp_path / "a/bin/ping"):  # the host's own label, not the layer's
        assert os.getxattr(tmp_path / "a/bin/ping", "security.selinux") != b"system_u"
    unpack(_xattr_layer({"LIBARCHIVE.xattr.security.capability": base64.b64encode(CAP_NET_RAW).decode()}),
           tmp_path / "b")
    assert os.getxattr(tmp_path / "b/bin/ping", "security.capability") == CAP_NET_RAW


def test_overlay_metadata_from_a_layer_is_refused(tmp_path):
    """trusted.overlay.redirect would send overlayfs to another path of the lower layers."""
    with pytest.raises(UnsafeLayer, match="trusted.overlay.redirect"):
        unpack(_xattr_layer({"SCHILY.xattr.trusted.overlay.redirect": "/etc"}), tmp_path / "root")
