"""engines.criu: the cause named for a failed dump or restore, from CRIU's own log.

The fixtures in data/ are excerpts of real criu 4.2.1 logs (-v4), made on this project's
test machine: a restore whose process had a file open or mapped that was removed since
(once with "during" in its path, which a loose pattern took for io_uring), and a dump
of a process holding an io_uring instance."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapbuild.engines import criu

DATA = Path(__file__).parent / "data"


def excerpt(name: str) -> str:
    return criu.errors_from_log(DATA / name)


@pytest.mark.parametrize("name, path", [
    ("restore-missing-mapped-file.log", "/tmp/cfx/run/cache/inductor/during_compile.main.so"),
    ("restore-missing-open-file.log", "/tmp/cfx/run/cache/kernel.main.so"),
])
def test_a_file_missing_on_restore_is_named_as_such_not_as_io_uring(name, path):
    what, change = criu.explain(excerpt(name))
    assert what == (f"the file {path}, which a process of the server had open or mapped at the checkpoint, "
                    "is not on this node")
    assert "io_uring" not in what and "$SNAPBUILD_RUN" in change


def test_an_io_uring_instance_is_named_from_what_criu_really_says():
    what, change = criu.explain(excerpt("dump-io-uring.log"))
    assert what.startswith("an io_uring instance") and "io_uring: allow" in change


def test_only_criu_error_lines_decide():
    """Info lines (paths, words like "during" or "measuring") say nothing about the cause."""
    log = ("(00.01) Opening /srv/app/measuring_uring.py\n"
           "(00.02)  77: Error (criu/files-reg.c:2353): Can't open file srv/app/x.so on restore: "
           "No such file or directory\n")
    assert criu.explain(log)[0].startswith("the file /srv/app/x.so,")
    assert criu.explain("(00.01) restoring during the night\n(00.02) Error (criu/x.c:1): Restoring FAILED.") is None


def test_a_failed_run_names_the_cause_even_above_the_last_lines(tmp_path, monkeypatch):
    """The cause is often followed by many consequences: all of CRIU's error lines are read."""
    log = tmp_path / "restore.log"
    cause = (DATA / "restore-missing-mapped-file.log").read_text()
    log.write_text(cause + "".join(f"(01.{i:02d}) Error (criu/x.c:{i}): consequence {i}\n" for i in range(20)))

    class Failed:
        returncode, stdout, stderr = 1, "", ""

    monkeypatch.setattr(criu, "binary", lambda: "criu")
    monkeypatch.setattr(criu.tools, "run", lambda *a, **k: Failed())
    with pytest.raises(criu.CriuError) as e:
        criu.run(["restore"], log=log, what="restore")
    assert "the file /tmp/cfx/run/cache/inductor/during_compile.main.so" in e.value.message
    assert "io_uring" not in e.value.message + (e.value.hint or "")
