"""The node settings (snapbuild/settings.py): one table, default < file < environment <
flag, clear errors, and no SNAPBUILD_* variable of the table read anywhere else."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import snapbuild
from snapbuild.errors import UsageError
from snapbuild import settings
from snapbuild.runner.cli import main

PACKAGE = Path(snapbuild.__file__).parent


@pytest.fixture
def node_toml(tmp_path, monkeypatch):
    """Write a node settings file and name it with $SNAPBUILD_CONFIG."""
    def write(text: str) -> Path:
        path = tmp_path / "node.toml"
        path.write_text(text)
        monkeypatch.setenv(settings.CONFIG_ENV, str(path))
        return path
    for s in settings.SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    return write


def test_precedence_default_file_environment_flag(node_toml, monkeypatch):
    assert settings.resolve("lazy_pages").source == "default" and settings.get("lazy_pages") is True
    path = node_toml('lazy_pages = false\ncache_max = "2G"\ntree_limits = "depth=64"\n')
    v = settings.resolve("lazy_pages")
    assert (v.value, v.source) == (False, f"file {path}")
    assert settings.get("cache_max") == 2 << 30 and settings.get("tree_limits") == "depth=64"
    monkeypatch.setenv("SNAPBUILD_LAZY_PAGES", "YES")
    v = settings.resolve("lazy_pages")
    assert (v.value, v.source) == (True, "environment SNAPBUILD_LAZY_PAGES")
    v = settings.resolve("lazy_pages", flag=False)
    assert (v.value, v.source) == (False, "flag")
    # values are read on each call: nothing cached
    monkeypatch.setenv("SNAPBUILD_LAZY_PAGES", "off")
    assert settings.get("lazy_pages") is False
    path.write_text("registry_plain_http = true\n")
    assert settings.get("registry_plain_http") is True and settings.get("cache_max") is None


def test_a_removed_key_in_the_file_is_ignored(node_toml):
    node_toml("lazy_images = true\nlazy_pages = false\n")
    assert settings.get("lazy_pages") is False and "lazy_images" not in {v.key for v in settings.effective()}


def test_the_file_reaches_the_modules_that_use_it(node_toml):
    from snapbuild.runner import node_cache, restore
    from snapbuild.runtime import layout
    from snapbuild.schema import allowed_mount_roots
    from snapbuild.store.tree import tree_limits

    node_toml('run_root = "/srv/run"\nallow_mount_roots = ["/usr/local/models"]\ntree_limits = "depth=9"\n'
              'cache_max = 1024\npull_direct = false\nthp_fill = "OFF"\n')
    assert layout.run_root() == Path("/srv/run")
    assert allowed_mount_roots() == ("/usr/local/models",)
    assert tree_limits().depth == 9
    assert node_cache.limit_from_env() == 1024 and restore.direct_default() is False
    from snapbuild.engines import criu

    assert criu.thp_setting() == "off" and criu.thp_fill_unused().startswith("thp_fill = off in ")


@pytest.mark.parametrize("text, words", [
    ("lazy_page = true\n", "unknown key 'lazy_page'"),
    ('lazy_pages = "on"\n', "lazy_pages must be true or false, not 'on'"),
    ("cache_max = true\n", "cache_max must be a size"),
    ('cache_max = "lots"\n', "cache_max must be a size"),
    ('allow_mount_roots = "/opt"\n', "allow_mount_roots must be a list of strings"),
    ("criu = 3\n", "criu must be a path (a string), not 3"),
    ('thp_fill = "sometimes"\n', "thp_fill must be auto, on or off, not 'sometimes'"),
    ("lazy_pages = \n", "is not valid TOML"),
])
def test_a_bad_file_is_a_usage_error_naming_file_and_key(text, words, node_toml):
    path = node_toml(text)
    with pytest.raises(UsageError, match=re.escape(words)) as e:
        settings.get("home")
    assert str(path) in e.value.message


def test_a_named_file_must_exist_and_the_default_one_may_not(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "DEFAULT_FILE", tmp_path / "absent.toml")
    assert settings.config_file() == (None, False) and settings.resolve("criu").source == "default"
    monkeypatch.setenv(settings.CONFIG_ENV, str(tmp_path / "typo.toml"))
    with pytest.raises(UsageError, match=r"node settings file .*typo.toml does not exist"):
        settings.get("criu")
    monkeypatch.delenv(settings.CONFIG_ENV)
    (tmp_path / "absent.toml").write_text("criu = '/opt/criu'\n")
    assert settings.resolve("criu").value == Path("/opt/criu")


@pytest.mark.parametrize("text, want", [("on", True), ("1", True), ("TRUE", True), ("Yes", True),
                                        ("off", False), ("0", False), ("False", False), ("no", False)])
def test_one_spelling_of_booleans_in_the_environment(text, want, monkeypatch):
    monkeypatch.setenv("SNAPBUILD_REGISTRY_PLAIN_HTTP", text)
    assert settings.get("registry_plain_http") is want


@pytest.mark.parametrize("env", [s.env for s in settings.SETTINGS if s.type == "bool"])
def test_a_bad_boolean_names_its_variable(env, monkeypatch):
    monkeypatch.setenv(env, "sometimes")
    with pytest.raises(UsageError, match=f"{env} must be on or off .*not 'sometimes'"):
        settings.effective()


def test_every_setting_is_documented_and_typed():
    keys = [s.key for s in settings.SETTINGS]
    assert len(keys) == len(set(keys)) and len(keys) >= 18 and set(settings.REMOVED).isdisjoint(keys)
    for s in settings.SETTINGS:
        assert s.type in settings.TYPES and s.env.startswith("SNAPBUILD_") and len(s.doc) > 20, s
        assert s.type == "str" or not s.choices, s
    assert {"SNAPBUILD_REGISTRY_USERNAME", "SNAPBUILD_REGISTRY_PASSWORD"}.isdisjoint(s.env for s in settings.SETTINGS)
    assert "credentials" in settings.__doc__ and "environment only" in settings.__doc__


def test_the_defaults_agree_with_the_modules_own():
    from snapbuild.registry.hosts import DEFAULT_DIR
    from snapbuild.runtime.cdi import DIRS
    from snapbuild.runtime.layout import DEFAULT_RUN_ROOT

    assert settings.BY_KEY["run_root"].default == Path(DEFAULT_RUN_ROOT)
    assert settings.BY_KEY["hosts_dir"].default == Path(DEFAULT_DIR)
    assert settings.BY_KEY["cdi_dirs"].default == tuple(Path(d) for d in DIRS)


def _env_reads(tree: ast.AST) -> set[str]:
    """SNAPBUILD_* names read from os.environ in a module: os.environ.get(NAME),
    os.environ[NAME], os.getenv(NAME), NAME a string or a module constant."""
    consts = {t.id: n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)
              and isinstance(n.value.value, str)}

    def name(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return consts.get(node.id) if isinstance(node, ast.Name) else None

    found = set()
    for n in ast.walk(tree):
        arg = None
        if isinstance(n, ast.Call) and n.args and ast.unparse(n.func) in ("os.environ.get", "os.getenv", "environ.get"):
            arg = n.args[0]
        elif isinstance(n, ast.Subscript) and ast.unparse(n.value) in ("os.environ", "environ") \
                and isinstance(n.ctx, ast.Load):
            arg = n.slice
        elif isinstance(n, ast.Compare) and any(isinstance(c, ast.Name | ast.Attribute)
                                                and ast.unparse(c) in ("os.environ", "environ")
                                                for c in n.comparators):
            arg = n.left
        if arg is not None and (value := name(arg)):
            found.add(value)
    return found


def test_no_covered_variable_is_read_outside_the_settings_module():
    covered = {s.env for s in settings.SETTINGS}
    readers = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "settings.py" and path.parent.name == "runner":
            continue
        for env in _env_reads(ast.parse(path.read_text())) & covered:
            readers.setdefault(env, []).append(str(path.relative_to(PACKAGE)))
    assert readers == {}, "read these through snapbuild.settings"


def test_the_grep_sees_a_read():
    reads = _env_reads(ast.parse('import os\nX = "SNAPBUILD_CRIU"\nos.environ.get(X)\n'
                                 'os.environ["SNAPBUILD_HOME"]\nos.getenv("SNAPBUILD_LOG")\n'
                                 '"SNAPBUILD_RUN_ROOT" in os.environ\nos.environ["SNAPBUILD_S3_ENDPOINT"] = "w"\n'))
    assert reads == {"SNAPBUILD_CRIU", "SNAPBUILD_HOME", "SNAPBUILD_LOG", "SNAPBUILD_RUN_ROOT"}


def test_the_config_verb_in_process(node_toml, monkeypatch, capsys):
    path = node_toml('cache_max = "50G"\n')
    monkeypatch.setenv("SNAPBUILD_THP_FILL", "on")
    main(["config", "--json"])
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == [s.key for s in settings.SETTINGS]
    assert rows["cache_max"] == {"key": "cache_max", "value": 50 << 30, "source": f"file {path}",
                                 "env": "SNAPBUILD_NODE_CACHE_MAX", "doc": settings.BY_KEY["cache_max"].doc}
    assert (rows["thp_fill"]["value"], rows["thp_fill"]["source"]) == ("on", "environment SNAPBUILD_THP_FILL")
    assert rows["cdi_dirs"]["value"] == ["/etc/cdi", "/var/run/cdi"] and rows["criu"]["value"] is None
    main(["config"])
    out = capsys.readouterr().out
    assert f"# node settings file: {path}" in out and f"cache_max = {50 << 30}  # file {path}" in out
    assert "thp_fill = \"on\"  # environment SNAPBUILD_THP_FILL" in out


def test_a_bad_file_stops_any_verb_with_exit_2(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "node.toml"
    bad.write_text("nope = 1\n")
    monkeypatch.setenv(settings.CONFIG_ENV, "")  # restored after the test: main sets it for its children
    with pytest.raises(SystemExit) as e:
        main(["--config", str(bad), "stop", "999999999"])
    assert e.value.code == 2 and f"{bad}: unknown key 'nope'" in capsys.readouterr().err
