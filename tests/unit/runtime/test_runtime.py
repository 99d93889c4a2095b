"""Input trees on nodes, readiness probes and server start-up, without CRIU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapbuild.errors import SnapbuildError, UsageError
from snapbuild.runtime import probe as probes
from snapbuild.runtime import process, server
from snapbuild.runtime.trees import MARKER, ensure_tree, release
from snapbuild.schema import ServerSpec
from snapbuild.store.tree import build_tree


def a_tree(store, tmp_path: Path, text: str = "hello") -> str:
    f = tmp_path / "src.txt"
    f.write_text(text)
    digest, _ = build_tree(store.blobs, [("a.txt", f)])
    return digest


def test_ensure_tree_records_each_store_that_uses_it(store, tmp_path):
    from snapbuild.store import Store

    digest = a_tree(store, tmp_path)
    other = Store(tmp_path / "other")
    path, created = ensure_tree(store.blobs, digest, tmp_path / "root")
    assert created and (path / "a.txt").read_text() == "hello"
    assert (path / MARKER).read_text() == f"{store.home}\n"
    # A second store using the same tree (it already exists: nothing is read from `other`).
    path2, created2 = ensure_tree(other.blobs, digest, tmp_path / "root")
    assert path2 == path and not created2
    assert (path / MARKER).read_text().splitlines() == [str(store.home), str(other.home)]
    other.home.mkdir(parents=True, exist_ok=True)
    assert release(path, store.home) is False, "the other store still uses it"
    assert path.exists() and (path / MARKER).read_text() == f"{other.home}\n"
    assert release(path, store.home) is None, "no longer this store's"
    assert release(path, other.home, dry_run=True) is True and path.exists()
    assert release(path, other.home) is True and not path.exists()


def test_release_ignores_users_that_no_longer_exist(store, tmp_path):
    digest = a_tree(store, tmp_path)
    path, _ = ensure_tree(store.blobs, digest, tmp_path / "root")
    with open(path / MARKER, "a") as f:
        f.write(f"{tmp_path / 'deleted-store'}\n")
    assert release(path, store.home) is True and not path.exists()


def test_a_tree_folder_other_users_can_write_is_refused(store, tmp_path):
    digest = a_tree(store, tmp_path)
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)  # like /dev/shm: anyone could have put a "complete" tree here
    with pytest.raises(SnapbuildError, match="can be written by other users"):
        ensure_tree(store.blobs, digest, root)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a folder's owner needs root")
def test_a_tree_folder_owned_by_another_user_is_refused(store, tmp_path):
    digest = a_tree(store, tmp_path)
    root = tmp_path / "theirs"
    root.mkdir()
    os.chown(root, 65534, 65534)
    with pytest.raises(SnapbuildError, match="belongs to uid 65534"):
        ensure_tree(store.blobs, digest, root)


def test_log_probe_reads_only_what_this_run_wrote(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("old run: listening\n")
    offset = log.stat().st_size
    with pytest.raises(probes.ProbeFailed, match="not ready"):
        probes.wait_ready({"log": "listening"}, log_path=log, log_offset=offset, timeout=0.2)
    with open(log, "a") as f:
        f.write("new run: listening\n")
    assert probes.wait_ready({"log": "listening"}, log_path=log, log_offset=offset, timeout=1) < 1


def test_clear_stale_removes_an_earlier_runs_ready_file(tmp_path):
    ready = tmp_path / "ready"
    ready.write_text("")
    probes.clear_stale({"file": str(ready)})
    assert not ready.exists()
    probes.clear_stale({"file": str(ready)})  # nothing there: fine


def test_probe_address_and_port_in_use():
    assert probes.address({"http": "http://127.0.0.1:8123/healthz"}) == ("127.0.0.1", 8123)
    assert probes.address({"tcp": "[::1]:9000"}) == ("::1", 9000)
    assert probes.address({"log": "x"}) is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        addr = s.getsockname()
        assert probes.port_in_use(addr)
    assert not probes.port_in_use(addr)


def test_an_exercise_that_gets_no_answer_fails_as_a_probe():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(probes.ProbeFailed, match=r"POST http://127.0.0.1:\d+/infer got no answer"):
            probes.run_exercise([{"http": "POST /infer"}], base=f"http://127.0.0.1:{port}", log=lambda m: None)


def test_run_exercises_repeat_and_check_the_exit_status(tmp_path):
    count = tmp_path / "count"
    probes.run_exercise([{"run": f"echo x >> {count}", "repeat": 3}], base=None, log=lambda m: None)
    assert count.read_text() == "x\nx\nx\n"
    probes.run_exercise([{"run": "exit 3", "expect": 3}], base=None, log=lambda m: None)
    with pytest.raises(probes.ProbeFailed, match="exited with 1, expected 0"):
        probes.run_exercise([{"run": "false"}], base=None, log=lambda m: None)


def spec_for(tmp_path: Path, argv: list[str], ready: dict) -> ServerSpec:
    return ServerSpec(name="t", argv=argv, ready=ready, run_root=str(tmp_path / "run-root"),
                      run_dir=str(tmp_path / "run-root" / "run" / "t"))


def test_a_server_is_not_started_on_a_taken_port(store, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        spec = spec_for(tmp_path, [sys.executable, "-c", "pass"], {"http": f"http://127.0.0.1:{port}/"})
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is already taken"):
            server.start(spec, store.blobs)


def test_a_cold_boot_waits_for_its_own_log_line(store, tmp_path):
    code = "import time; time.sleep(0.5); print('serving', flush=True); time.sleep(30)"
    spec = spec_for(tmp_path, [sys.executable, "-c", code], {"log": "serving", "timeout": 10})
    log = Path(spec.run_dir) / server.LOG_NAME
    log.parent.mkdir(parents=True)
    log.write_text("serving (a previous run)\n")
    started = server.start(spec, store.blobs, fresh_log=False)
    try:
        t0 = time.monotonic()
        started.wait_ready(spec.ready)
        assert time.monotonic() - t0 >= 0.4, "the old line in the log must not count"
        assert log.read_text().count("serving") == 2
    finally:
        process.stop(started.pid)


@pytest.mark.parametrize("family,host,shown", [(socket.AF_INET, "127.0.0.1", "127.0.0.1"),
                                               (socket.AF_INET6, "::1", "[0000:0000:0000:0000:0000:0000:0000:0001]")])
def test_a_socket_is_named_by_its_address(family, host, shown):
    with socket.socket(family) as s, socket.socket(family) as c:
        s.bind((host, 0))
        s.listen()
        target = os.readlink(f"/proc/self/fd/{s.fileno()}")
        port = s.getsockname()[1]
        assert process.socket_name(target) == f"TCP {shown}:{port} (listening)"
        c.connect((host, port))
        assert process.socket_name(os.readlink(f"/proc/self/fd/{c.fileno()}")) == f"TCP {shown}:{c.getsockname()[1]}"
    assert process.socket_name("socket:[1]") == "socket:[1]", "unknown inodes are shown as they are"


ESCAPE = """
import os, time
if os.fork():
    os._exit(0)  # the parent goes: the grandchild, holding the socket, is re-parented outside the tree
os.setsid()
os.write(1, str(os.getpid()).encode()); os.close(1)
time.sleep(30)
"""


def test_a_process_outside_the_tree_holding_its_socket_is_found(tmp_path):
    """A daemon that double-forked holds the listening socket it inherited: it is no
    descendant of this process any more, so it escaped, and is found; a tree that lists
    it has no escape."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        child = subprocess.run([sys.executable, "-c", ESCAPE], pass_fds=[s.fileno()], stdout=subprocess.PIPE,
                               timeout=30, check=True)
        daemon = int(child.stdout)
        try:
            [(pid, target)] = process.escaped_holders([os.getpid()])
            assert pid == daemon and target == os.readlink(f"/proc/self/fd/{s.fileno()}")
            assert process.escaped_holders([os.getpid(), daemon]) == [], "inside the tree it is no escape"
        finally:
            os.kill(daemon, signal.SIGKILL)


def test_a_child_forked_after_the_tree_was_listed_is_no_escape():
    """gunicorn's arbiter forks its workers a moment apart (and again when one dies): a
    worker forked after the tree was listed holds the listening socket but is in the
    tree the checkpoint dumps; it must not fail the build as an escaped daemon (a CI
    run did, for aiohttp under gunicorn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=[s.fileno()])
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(t.startswith("socket:") for _, t in process.fds(child.pid)):
                time.sleep(0.02)
            assert process.escaped_holders([os.getpid()]) == []
        finally:
            child.kill()
            child.wait()
