"""What both command lines share: one exit-code table (docs/cli.md repeats it), one
definition of the restore options (`snapbuild run` and `snapbuild-runner restore`),
and stdlib logging with -v and SNAPBUILD_LOG."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
import re
from pathlib import Path

import pytest

import snapbuild
from snapbuild import errors, log

README = Path(snapbuild.__file__).parent.parent / "docs" / "cli.md"  # the exit status table


def all_error_classes() -> list[type]:
    for m in pkgutil.walk_packages(snapbuild.__path__, "snapbuild."):
        importlib.import_module(m.name)
    out, todo = [], [errors.SnapbuildError]
    while todo:
        c = todo.pop()
        out.append(c)
        todo += c.__subclasses__()
    return out


def test_every_error_exits_with_a_code_of_the_table():
    classes = all_error_classes()
    assert len(classes) > 15, "the walk found the package's error classes"
    odd = {c.__qualname__: c.exit_code for c in classes if c.exit_code not in errors.EXIT_CODES}
    assert odd == {}


def test_the_documented_exit_status_table_is_the_table():
    text = README.read_text()
    table = text.split("## Exit status", 1)[1].split("\n\n", 2)[1]
    codes = [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)]
    assert codes == list(errors.EXIT_CODES)


def test_a_missing_runc_exits_like_a_missing_criu(monkeypatch):
    from snapbuild.engines import criu
    from snapbuild.engines.oci import OciEngine

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(errors.SnapbuildError, match="runc is not installed") as runc:
        OciEngine().path()
    monkeypatch.setenv("SNAPBUILD_CRIU", "/nonexistent/criu")
    with pytest.raises(errors.SnapbuildError, match="not an executable") as missing_criu:
        criu.binary()
    assert runc.value.exit_code == missing_criu.value.exit_code == 8


def test_mount_errors_and_lock_drift_have_their_own_codes():
    from snapbuild.errors import MissingPin
    from snapbuild.lock import LockDrift
    from snapbuild.runtime.mounts import MountError

    assert MountError("x").exit_code not in (errors.UsageError.exit_code, 1)
    assert LockDrift("x").exit_code == MissingPin("x").exit_code == errors.RecipeError.exit_code


def test_run_and_the_runners_restore_take_the_same_options():
    from snapbuild.cli.main import cli
    from snapbuild.runner.cli import _parser

    run = cli.commands["run"]
    click_flags = {o for p in run.params for o in p.opts if o.startswith("--")}
    sub = next(a for a in _parser()._actions if a.dest == "command").choices["restore"]
    argparse_flags = {o for a in sub._actions for o in a.option_strings if o.startswith("--")}
    # what only one side has: snapbuild's S3 endpoint flag and click's own
    assert click_flags - {"--s3-endpoint"} == argparse_flags - {"--help"}, (click_flags, argparse_flags)
    assert set(inspect.signature(run.callback).parameters) == {"ref", "as_json", "options"}


def test_log_levels_from_flags_and_the_environment(monkeypatch):
    monkeypatch.delenv("SNAPBUILD_LOG", raising=False)
    assert [log.level(v) for v in (0, 1, 2, 3)] == [logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG]
    monkeypatch.setenv("SNAPBUILD_LOG", "DEBUG")
    assert log.level(0) == logging.DEBUG
    monkeypatch.setenv("SNAPBUILD_LOG", "error")
    assert log.level(0) == logging.ERROR and log.level(1) == logging.INFO, "-v only shows more"
    monkeypatch.setenv("SNAPBUILD_LOG", "loud")
    with pytest.raises(errors.UsageError, match="SNAPBUILD_LOG='loud' is not a log level"):
        log.level(0)


def test_log_lines_plain_and_json(monkeypatch, capsys):
    monkeypatch.delenv("SNAPBUILD_LOG", raising=False)
    logger = logging.getLogger("snapbuild.somewhere")
    try:
        log.setup(0)
        logger.info("hidden")
        logger.warning("overlay mount failed; copying")
        assert capsys.readouterr().err == "WARNING overlay mount failed; copying\n"
        log.setup(2)
        logger.debug("detail %d", 7)
        assert capsys.readouterr().err == "DEBUG snapbuild.somewhere: detail 7\n"
        log.setup(0, json_lines=True)
        logger.warning("mirror skipped")
        rec = json.loads(capsys.readouterr().err)
        assert (rec["event"], rec["level"], rec["logger"], rec["message"]) == \
            ("log", "warning", "snapbuild.somewhere", "mirror skipped")
    finally:
        log.setup(0)


def test_an_overlay_that_cannot_mount_is_a_warning(tmp_path, monkeypatch, caplog):
    from snapbuild import rootfs

    def refuse(*_a):
        raise errors.SnapbuildError("overlay mount failed: no overlay here")

    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "f").write_text("x")
    monkeypatch.setattr(rootfs, "overlay_mount", refuse)
    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="snapbuild"):
        assert rootfs.assemble([layer], tmp_path / "root", work=tmp_path / "work") == "copy"
    assert "overlay mount failed: no overlay here; copying the layers to" in caplog.text
    assert (tmp_path / "root" / "f").read_text() == "x"


def test_verbose_before_and_after_the_command(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from snapbuild.cli.main import cli

    monkeypatch.setenv("SNAPBUILD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SNAPBUILD_LOG", raising=False)
    (tmp_path / "app.txt").write_text("x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: v\nsteps:\n  app: {kind: files, include: [app.txt]}\n")
    try:
        r = CliRunner().invoke(cli, ["-v", "plan", str(recipe), "-v"])
        assert r.exit_code == 0, r.output
        assert logging.getLogger("snapbuild").level == logging.DEBUG, "two -v: debug"
        r = CliRunner(env={"SNAPBUILD_LOG": "loud"}).invoke(cli, ["plan", str(recipe)])
        assert r.exit_code == 2 and "SNAPBUILD_LOG='loud' is not a log level" in r.output, r.output
        assert "Traceback" not in r.output
    finally:
        log.setup(0)

    from snapbuild.runner.cli import main

    with pytest.raises(SystemExit) as stop:
        monkeypatch.setenv("SNAPBUILD_LOG", "loud")
        main(["-v", "gc", "-v", "--dry-run"])
    assert stop.value.code == 2
