"""The node's store as a bounded, shared cache: a chunk two snapshots share is fetched
once, and least recently used snapshots are let go to stay under the bound."""

from __future__ import annotations

import os
import time

import pytest

from snapbuild.build import build
from snapbuild.errors import UsageError
from snapbuild.runner.node_cache import parse_size, stored_bytes
from snapbuild.runner.pull import pull
from snapbuild.store import Store

pytestmark = pytest.mark.integration

MiB = 1 << 20


def test_sizes_parse():
    assert parse_size("50G") == 50 << 30 and parse_size("512m") == 512 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096
    with pytest.raises(UsageError, match="expected a number of bytes"):
        parse_size("lots")


def test_shared_chunks_are_fetched_once_and_old_snapshots_make_room(recipe, project, store, tmp_path, run_cli):
    (project / "shared").mkdir()
    (project / "shared" / "base.bin").write_bytes(os.urandom(8 * MiB))  # two chunks every snapshot has
    for name in ("a", "b", "c"):
        (project / name).mkdir()
        (project / name / "own.bin").write_bytes(os.urandom(8 * MiB))
        path = recipe(f"name: {name}\nsteps:\n  base: {{kind: files, root: shared}}\n"
                      f"  own: {{kind: files, root: {name}}}\npublish: {{tag: \"{name}:v1\", steps: [base, own]}}\n",
                      name=f"{name}.yaml")
        [res] = build(path, store=store)
        assert res.ok
    reg = f"file://{store.home / 'registry'}"
    node = Store(tmp_path / "node")
    first = pull("a:v1", registry=reg, store=node)
    second = pull("b:v1", registry=reg, store=node)
    assert first["bytes_fetched"] > 16 * MiB and 8 * MiB < second["bytes_fetched"] < 9 * MiB, \
        "b fetched only its own chunks: the shared ones were there"
    time.sleep(0.05)
    pull("a:v1", registry=reg, store=node)  # a used again: b is now the least recently used
    time.sleep(0.05)
    third = pull("c:v1", registry=reg, store=node, cache_max=30 * MiB)
    assert third["cache"]["evicted"] == ["b"] and third["cache"]["fits"], third["cache"]
    assert stored_bytes(node) <= 30 * MiB
    assert pull("a:v1", registry=reg, store=node)["bytes_fetched"] == 0, "a stayed, with the shared chunks"
    again = pull("b:v1", registry=reg, store=node)
    assert 8 * MiB < again["bytes_fetched"] < 9 * MiB, "b comes back for its own chunks only"

    r = run_cli("pull", "c:v1", "--registry", reg, "--cache-max", "1M", "--json", tool="snapbuild-runner",
                env={"SNAPBUILD_HOME": str(node.home)})
    assert r.code == 0, r
    assert r.json()["cache"]["fits"] is False and sorted(r.json()["cache"]["evicted"]) == ["a", "b"], \
        "the snapshot just pulled always stays, even over the bound"


def test_a_full_disk_lets_old_snapshots_go_then_says_so(recipe, project, store, tmp_path, run_cli):
    """A node store on a 16 MiB file system (a tmpfs mounted for the test)."""
    import subprocess

    sizes = {"a": 10, "b": 10, "huge": 30}
    for name, mib in sizes.items():
        (project / name).mkdir()
        (project / name / "own.bin").write_bytes(os.urandom(mib * MiB))
        path = recipe(f"name: {name}\nsteps:\n  own: {{kind: files, root: {name}}}\n"
                      f"publish: {{tag: \"{name}:v1\"}}\n", name=f"{name}.yaml")
        [res] = build(path, store=store)
        assert res.ok
    reg = f"file://{store.home / 'registry'}"
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        node = Store(disk / "node")
        pull("a:v1", registry=reg, store=node)
        second = pull("b:v1", registry=reg, store=node)  # does not fit beside a
        assert second["disk_full_evicted"] == ["a"] and second["bytes_fetched"] >= 10 * MiB
        r = run_cli("pull", "huge:v1", "--registry", reg, tool="snapbuild-runner",
                    env={"SNAPBUILD_HOME": str(node.home)})
        assert r.code == 1 and "the node's disk is full" in r.err and "even after letting go of b" in r.err, r.err
        assert "TIP" in r.err
        assert not [p for p in (node.home / "tmp").rglob("*") if p.is_file()], "no half-written blob left"
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def _files_of(root):
    """Every path below ``root`` with its mode and content (a link: its target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
        out[p.relative_to(root).as_posix()] = (st.st_mode, body)
    return out


def test_pull_dest_killed_midway_then_run_again_finishes_the_job(recipe, project, store, tmp_path, run_cli):
    """`pull --dest` SIGKILLed while it writes an output leaves a `.partial` folder; the
    same command run again reuses what the first run finished, removes the rest, and
    gives what a clean pull gives. A destination holding anything else is still refused."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    for name, count in (("many", 4000), ("more", 4000)):  # thousands of files: writing one takes a while
        (project / name).mkdir()
        for i in range(count):
            (project / name / f"f{i:05}.txt").write_bytes(os.urandom(64 + i % 512))
    (project / "many" / "w.bin").write_bytes(os.urandom(6 * MiB))
    path = recipe('name: pair\nsteps:\n  many: {kind: files, root: many}\n  more: {kind: files, root: more}\n'
                  'publish: {tag: "pair:v1", steps: [many, more]}\n', name="pair.yaml")
    [res] = build(path, store=store)
    assert res.ok
    reg = f"file://{store.home / 'registry'}"
    node = {"SNAPBUILD_HOME": str(tmp_path / "node")}
    dest = tmp_path / "dest"
    cmd = [str(Path(sys.executable).parent / "snapbuild-runner"), "pull", "pair:v1", "--registry", reg,
           "--dest", str(dest)]
    proc = subprocess.Popen(cmd, env={**os.environ, **node}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (dest.is_dir() and any(n.endswith(".partial") for n in os.listdir(dest))):
        assert proc.poll() is None and time.monotonic() < deadline, ("it ended before writing", proc.stderr.read())
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(os.listdir(dest))
    assert any(n.endswith(".partial") for n in left), left

    r = run_cli(*cmd[1:], tool="snapbuild-runner", env=node)
    assert r.code == 0, r
    clean = tmp_path / "clean"
    assert run_cli(*cmd[1:-1], clean, tool="snapbuild-runner", env=node).code == 0
    assert sorted(os.listdir(dest)) == ["many", "more"], "nothing of the first run is left but its outputs"
    assert _files_of(dest) == _files_of(clean)

    # Someone else's file in a destination an interrupted pull left is not removed: refused.
    other = tmp_path / "other"
    (other / ".many.x1.partial").mkdir(parents=True)
    (other / ".snapbuild-pull.json").write_text('{"digest": "sha256:' + "0" * 64 + '", "outputs": ["many"]}')
    (other / "notes.txt").write_text("mine\n")
    r = run_cli(*cmd[1:-1], other, tool="snapbuild-runner", env=node)
    assert r.code == 2 and "'notes.txt' is not from the interrupted pull" in r.err, r
    assert (other / "notes.txt").read_text() == "mine\n"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x").write_text("x")
    r = run_cli(*cmd[1:-1], tmp_path / "plain", tool="snapbuild-runner", env=node)
    assert r.code == 2 and "is not empty" in r.err, r
