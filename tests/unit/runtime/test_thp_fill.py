"""When a plain restore reads memory into huge pages (engines/criu.thp_fill_unused): the
setting, the criu binary, the kernel's THP mode and a VM's free page reporting, each
faked here; the integration tests (test_lazy_pages, test_containers) restore for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapbuild.engines import criu
from snapbuild.errors import UsageError


def balloon(root: Path, name: str, features: str, *, device: str = "0x0005", bound: bool = True) -> None:
    """A virtio device folder as /sys/bus/virtio/devices shows one."""
    dev = root / name
    dev.mkdir(parents=True)
    (dev / "device").write_text(device + "\n")
    (dev / "features").write_text(features + "\n")
    if bound:
        (dev / "driver").mkdir()


def test_free_page_reporting_is_the_balloon_feature_bit_5(tmp_path):
    order = tmp_path / "page_reporting_order"
    assert not criu.reports_free_pages(tmp_path / "absent", order), "no virtio bus: bare metal"
    balloon(tmp_path, "virtio0", "0110000000")  # the balloon without reporting (bit 5 clear)
    balloon(tmp_path, "virtio1", "0010011001", device="0x0002")  # a block device: bit 5 means something else
    balloon(tmp_path, "virtio2", "0110010000", bound=False)  # no driver bound: nothing reports
    assert not criu.reports_free_pages(tmp_path, order)
    balloon(tmp_path, "virtio3", "0110010100")
    assert criu.reports_free_pages(tmp_path, order)
    order.write_text("9\n")  # 2 MiB blocks and up are reported
    assert criu.reports_free_pages(tmp_path, order)
    order.write_text("11\n")  # an operator turned reporting off: no free block is that big
    assert not criu.reports_free_pages(tmp_path, order)


@pytest.fixture
def node(monkeypatch):
    """A node with a patched criu, THP in madvise mode and no free page reporting; a
    test changes what it needs."""
    state = {"has": True, "mode": "madvise", "reports": False}
    monkeypatch.setattr(criu, "binary", lambda: "/usr/sbin/criu")
    monkeypatch.setattr(criu, "has_thp_fill", lambda path: state["has"])
    monkeypatch.setattr(criu, "thp_mode", lambda: state["mode"])
    monkeypatch.setattr(criu, "reports_free_pages", lambda: state["reports"])
    monkeypatch.delenv(criu.THP_ENV, raising=False)
    return state


def test_auto_uses_huge_pages_unless_the_vm_reports_free_memory(node, monkeypatch):
    assert criu.thp_fill_unused() is None
    node["reports"] = True
    assert "hands free memory back to its host" in criu.thp_fill_unused()
    monkeypatch.setenv(criu.THP_ENV, "on")
    assert criu.thp_fill_unused() is None, "on: wherever they work"
    monkeypatch.setenv(criu.THP_ENV, "off")
    node["reports"] = False
    assert criu.thp_fill_unused() == "SNAPBUILD_THP_FILL=off"


@pytest.mark.parametrize("setting", ["auto", "on"])
def test_no_patch_or_no_thp_means_small_pages_whatever_the_setting(node, monkeypatch, setting):
    monkeypatch.setenv(criu.THP_ENV, setting)
    node["has"] = False
    assert "has no --thp-fill" in criu.thp_fill_unused() and "ci/install-criu.sh" in criu.thp_fill_unused()
    node["has"], node["mode"] = True, "never"
    assert criu.thp_fill_unused() == "transparent huge pages are never (/sys/kernel/mm/transparent_hugepage)"
    node["mode"] = None
    assert "transparent huge pages are not in this kernel" in criu.thp_fill_unused()
    node["mode"] = "always"
    assert criu.thp_fill_unused() is None


def test_a_setting_that_is_not_auto_on_or_off_is_refused(node, monkeypatch):
    monkeypatch.setenv(criu.THP_ENV, "sometimes")
    with pytest.raises(UsageError, match="SNAPBUILD_THP_FILL must be auto, on or off, not 'sometimes'"):
        criu.thp_fill_unused()
    monkeypatch.setenv(criu.THP_ENV, " ON ")
    assert criu.thp_fill_unused() is None, "case and spaces do not matter"


def test_the_kernel_mode_is_the_bracketed_word():
    mode = criu.thp_mode()
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    assert mode is None if not text.exists() else f"[{mode}]" in text.read_text()
