"""Mount points a recipe may name (checked at load, before anything is mounted)."""

import pytest

from snapbuild.schema import mount_point_problem


@pytest.mark.parametrize("dest", ["/models/minilm", "/opt/weights", "/srv/m/v1", "/var/models/x"])
def test_model_paths_are_accepted(dest):
    assert mount_point_problem(dest) is None


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
    assert why in (mount_point_problem(dest) or "")
