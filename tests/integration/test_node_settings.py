"""The node settings file, read by the real `snapbuild-runner`: `config` says every
value and where it comes from, and an environment variable beats the file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from snapbuild import settings

pytestmark = pytest.mark.integration


@pytest.fixture
def clean_env(monkeypatch):
    """None of the table's variables set (but those the tests' conftest points at temp folders)."""
    kept = {"SNAPBUILD_RUN_ROOT", "SNAPBUILD_HOSTS_DIR", "SNAPBUILD_IMAGE_CACHE", "SNAPBUILD_HOME"}
    for s in settings.SETTINGS:
        if s.env not in kept:
            monkeypatch.delenv(s.env, raising=False)


def test_config_json_with_a_file_and_an_override(tmp_path, run_cli, clean_env):
    node = tmp_path / "node.toml"
    node.write_text('lazy_pages = false\ncache_max = "50G"\nallow_mount_roots = ["/usr/local/models"]\n'
                    'thp_fill = "on"\n')
    r = run_cli("--config", node, "config", "--json", tool="snapbuild-runner", env={"SNAPBUILD_THP_FILL": "off"})
    assert r.code == 0, r.err
    rows = {row["key"]: row for row in json.loads(r.out)}
    assert set(rows) == set(settings.BY_KEY) and all(set(row) == {"key", "value", "source", "env", "doc"}
                                                     for row in rows.values())
    assert (rows["lazy_pages"]["value"], rows["lazy_pages"]["source"]) == (False, f"file {node}")
    assert (rows["cache_max"]["value"], rows["cache_max"]["env"]) == (50 << 30, "SNAPBUILD_NODE_CACHE_MAX")
    assert rows["allow_mount_roots"]["value"] == ["/usr/local/models"]
    assert (rows["thp_fill"]["value"], rows["thp_fill"]["source"]) == ("off", "environment SNAPBUILD_THP_FILL")
    assert (rows["registry_plain_http"]["value"], rows["registry_plain_http"]["source"]) == (False, "default")


def test_config_text_names_the_sources(tmp_path, run_cli, clean_env):
    node = tmp_path / "node.toml"
    node.write_text("registry_plain_http = true\n")
    r = run_cli("config", tool="snapbuild-runner", env={"SNAPBUILD_CONFIG": str(node), "SNAPBUILD_PULL_DIRECT": "no"})
    assert r.code == 0, r.err
    assert f"# node settings file: {node}" in r.out
    assert f"registry_plain_http = true  # file {node}" in r.out
    assert "pull_direct = false  # environment SNAPBUILD_PULL_DIRECT" in r.out
    assert "lazy_pages = true  # default" in r.out and "$SNAPBUILD_LAZY_PAGES: host processes" in r.out


@pytest.mark.parametrize("text, words", [
    (None, "does not exist"),
    ("lazy_pages = 'on'\n", "lazy_pages must be true or false, not 'on'"),
    ("nope = 1\n", "unknown key 'nope'"),
])
def test_a_bad_settings_file_stops_the_command(text, words, tmp_path, run_cli, clean_env):
    node = tmp_path / "node.toml"
    if text is not None:
        node.write_text(text)
    for args in (("config",), ("gc", "--dry-run")):
        r = run_cli("--config", node, *args, tool="snapbuild-runner")
        assert r.code == 2 and str(node) in r.err and words in r.err and "Traceback" not in r.err, (args, r.err)


def test_a_bad_boolean_in_the_environment_names_the_variable(run_cli, clean_env):
    r = run_cli("config", tool="snapbuild-runner", env={"SNAPBUILD_PULL_DIRECT": "maybe"})
    assert r.code == 2 and "SNAPBUILD_PULL_DIRECT must be on or off" in r.err, r.err


@pytest.mark.parametrize("args", [("config",), ("gc", "--dry-run"), ("serve", "--server", "a=x:y", "--check")])
def test_a_removed_key_in_an_old_file_is_ignored_with_one_warning(args, tmp_path, run_cli, clean_env):
    node = tmp_path / "node.toml"
    node.write_text("lazy_images = true\nlazy_pages = false\n")
    r = run_cli("--config", node, *args, tool="snapbuild-runner")
    assert r.code == 0 and r.err.count(f"{node}: lazy_images is ignored: tree images fetched as they are read") == 1, r.err
    assert "lazy_images" not in r.out
    if args == ("config",):
        assert f"lazy_pages = false  # file {node}" in r.out, r.out


def test_a_reader_that_goes_away_gets_no_traceback(clean_env):
    """`snapbuild-runner config | head -1`: the pipe is closed under the output (here
    before the first write, so that it always is)."""
    import os
    import subprocess

    runner = str(Path(sys.executable).parent / "snapbuild-runner")
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([runner, "config"], stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert p.returncode == 141, p
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
