"""Mount points a recipe may name (checked at load, before anything is mounted)."""

import pytest

from snapbuild.runtime.mounts import check_destination


@pytest.mark.parametrize("dest", ["/models/minilm", "/opt/weights", "/srv/m/v1", "/var/lib/models/x"])
def test_model_paths_are_accepted(dest):
    assert check_destination(dest) is None


@pytest.mark.parametrize("dest, why", [
    ("models/x", "must be an absolute path"),
    ("/models/../etc", "without '..'"),
    ("/", "would cover a system path"),
    ("/usr", "would cover a system path"),
    ("/etc/", "would cover a system path"),
    ("/proc/self", "would cover a system path"),
    ("/dev/shm", "would cover a system path"),
])
def test_relative_and_system_paths_are_refused(dest, why):
    assert why in (check_destination(dest) or "")
