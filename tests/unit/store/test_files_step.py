"""The files kind refuses to store content that changed after its key was computed."""

from __future__ import annotations

import io

import pytest

from snapbuild.errors import StepError
from snapbuild.steps import BuildContext, PinContext
from snapbuild.steps.files import FilesSpec, FilesStep


def test_files_changed_between_plan_and_build_fail_the_step(store, project):
    (project / "a.txt").write_text("at plan time")
    kind, spec = FilesStep(), FilesSpec(kind="files")
    pins = kind.pins(spec, PinContext(base_dir=project, store=store))
    (project / "a.txt").write_text("edited during the build")
    ctx = BuildContext(name="src", key="k", store=store, base_dir=project, log=io.StringIO(),
                       log_path=project / "log", pins=pins)
    with pytest.raises(StepError, match="files changed while the build was running: a.txt"):
        kind.build(spec, ctx)
    (project / "a.txt").write_text("at plan time")
    assert kind.build(spec, ctx).startswith("sha256:")


def test_special_files_are_left_out(store, project):
    import os

    (project / "a.txt").write_text("x")
    os.mkfifo(project / "pipe")  # reading it would block the plan forever
    pins = FilesStep().pins(FilesSpec(kind="files"), PinContext(base_dir=project, store=store))
    assert list(pins["files"]) == ["a.txt"]
