"""Process snapshots with the real CRIU (engine host): build, restore, fall back.

Needs root and a CRIU >= 4.2 (ci/setup.sh installs one). Servers listen on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.errors import IntegrityError, UsageError
from snapbuild.registry import open_registry, parse_ref
from snapbuild.registry.transfer import push
from snapbuild.runner.restore import RestoreFailed, run, stop
from snapbuild.runtime import process
from snapbuild.runtime.layout import run_root
from snapbuild.schema import Runtime
from snapbuild.store import Store
from snapbuild.store.fsutil import canonical_json
from snapbuild.store.snapshot import load_config, parse_manifest

from testkit import free_port, port_free, post  # tests/integration/testkit.py

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COUNTER = Path(__file__).parent / "data" / "counter_server.py"





def counter_recipe(recipe, port: int, extra_args: str = "", run: str | None = None, timeout: int = 30,
                   ready: str | None = None, exercise: str = '{http: "POST /count", repeat: 2}') -> Path:
    command = run or f'{sys.executable} $SNAPBUILD_INPUTS/app/counter_server.py --port {port} {extra_args}'
    ready = ready or f'http: "http://127.0.0.1:{port}/healthz"'
    path = recipe(f"""
        name: counter
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            run: "{command}"
            ready: {{{ready}, timeout: {timeout}}}
            exercise: [{exercise}]
          snap: {{kind: checkpoint, process: server}}
        publish: {{tag: "counter:v1"}}
    """)
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(COUNTER, path.parent / "app" / "counter_server.py")
    return path


def no_server_left(marker: str) -> bool:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [p for p in out if int(p) != os.getpid()] == []


def test_counter_snapshot_restores_warm_state_and_boots_cold(recipe, store):
    port = free_port()
    [res] = build(counter_recipe(recipe, port), store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    assert [r.status for r in res.steps.values()] == ["built", "built", "built"]
    assert port_free(port) and no_server_left("counter_server.py"), "the warm-up server must not outlive the build"
    doc = load_runtime(store, "counter:v1")  # what the build wrote reads back, field for field, for this node
    assert Runtime.from_json(doc, node_root=run_root()).to_json() == doc

    out = run("counter:v1", store=store)
    try:
        assert out["mode"] == "restore" and out["reason"] is None, out
        assert set(out["timings"]) >= {"fetch_s", "materialize_s", "restore_s", "ready_s", "total_s"}
        answer = post(port, "/count")
        assert answer["count"] == 3, "two warm-up calls happened before the checkpoint"
        # its own PID, as at the warm-up, in a PID namespace of its own (runtime/pidns.py)
        assert answer["pid"] == load_runtime(store, "counter:v1")["pids"][0] == process.ns_pid(out["pid"])
        assert answer["pid"] != out["pid"], "this machine knows it by another number"
        with pytest.raises(UsageError, match=f"port {port}"):
            run("counter:v1", store=store)  # the restored server still holds the port
    finally:
        stop(out["pid"])
    assert "POST /count" in Path(out["log"]).read_text().splitlines()[-1], "the restored server keeps logging"

    cold = run("counter:v1", store=store, mode="cold")
    try:
        assert cold["mode"] == "cold" and post(port, "/count")["count"] == 1
    finally:
        stop(cold["pid"])
    assert port_free(port)


def load_runtime(store: Store, ref: str) -> dict:
    """The runtime section (checkpoint.json) of a snapshot in the store's registry."""
    reg = open_registry(f"file://{store.home / 'registry'}")
    r = parse_ref(ref)
    digest = reg.resolve(r)
    return load_config(store.blobs, parse_manifest(reg.get_blob(r.name, digest), digest))["runtime"]


def retarget(store: Store, ref: str, new_tag: str, change, what: str = "fingerprint") -> str:
    """Publish a copy of a snapshot whose runtime fingerprint (or whole runtime section)
    is changed, as if built elsewhere (digests recomputed: the copy verifies)."""
    reg = open_registry(f"file://{store.home / 'registry'}")
    r = parse_ref(ref)
    digest = reg.resolve(r)
    manifest = parse_manifest(reg.get_blob(r.name, digest), digest)
    config = load_config(store.blobs, manifest)
    change(config["runtime"]["fingerprint"] if what == "fingerprint" else config["runtime"])
    data = canonical_json(config)
    manifest["config"] = {**manifest["config"], "digest": store.blobs.put(data), "size": len(data)}
    new = store.blobs.put(canonical_json(manifest))
    push(reg, parse_ref(new_tag), new, [manifest["config"]["digest"]] + [x["digest"] for x in manifest["layers"]],
         store.blobs)
    return new_tag


def test_fingerprint_mismatch_boots_cold_and_says_why(recipe, store):
    port = free_port()
    [res] = build(counter_recipe(recipe, port), store=store)
    assert res.ok
    tag = retarget(store, "counter:v1", "counter:other-cpu",
                   lambda fp: (fp["cpu_flags"].append("avx1024"), fp.update(kernel="0.0-other")))
    out = run(tag, store=store)
    try:
        assert out["mode"] == "cold"
        assert "fingerprint mismatch" in out["reason"] and "avx1024" in out["reason"]
        fields = {m["field"]: m["fatal"] for m in out["mismatches"]}
        assert fields == {"cpu_flags": True, "kernel": False}
        assert post(port, "/count")["count"] == 1
    finally:
        stop(out["pid"])
    with pytest.raises(RestoreFailed, match="avx1024"):
        run(tag, store=store, fallback="fail")
    assert port_free(port), "--fallback fail must not start anything"


def test_corrupt_chunk_in_registry_is_refused(recipe, store, tmp_path):
    port = free_port()
    [res] = build(counter_recipe(recipe, port), store=store)
    mirror = tmp_path / "mirror"
    shutil.copytree(store.home / "registry", mirror)  # a copy: no hard links into the store
    blobs = mirror / "counter" / "blobs" / "sha256"
    victim = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x10
    victim.write_bytes(bytes(data))
    node = Store(tmp_path / "node")
    with pytest.raises(IntegrityError, match="corrupt"):
        run("counter:v1", registry=f"file://{mirror}", store=node)
    assert port_free(port) and no_server_left("counter_server.py"), "nothing may run from corrupt data"


def test_warmup_failures_name_the_step_and_leave_nothing_running(recipe, store, tmp_path):
    port = free_port()
    path = counter_recipe(recipe, port, run="echo about to die; exit 3")
    [res] = build(path, store=store)
    st = {n: (r.status, r.error or "") for n, r in res.steps.items()}
    assert st["snap"][0] == "failed" and st["server"][0] == "failed"
    assert "exited before it was ready" in st["server"][1]
    assert "about to die" in res.steps["snap"].log_tail

    marker = tmp_path / "never-ready-marker"
    path = counter_recipe(recipe, port, run=f"exec {sys.executable} -c 'import time; time.sleep(300)' {marker}",
                          timeout=1)
    [res] = build(path, store=store)
    assert res.steps["snap"].status == "failed" and "not ready after 1 s" in res.steps["snap"].error
    assert no_server_left(str(marker)), "a server that never got ready must be stopped"


def test_a_taken_port_fails_the_warmup_before_it_starts(recipe, store):
    with socket.socket() as other:  # someone else's server on the recipe's port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        [res] = build(counter_recipe(recipe, port), store=store)
    snap = res.steps["snap"]
    assert snap.status == "failed" and f"port {port} on 127.0.0.1 is already taken" in snap.error
    assert no_server_left("counter_server.py"), "the warm-up must not have started"


def test_an_exercise_that_gets_no_answer_fails_the_warmup(recipe, store):
    port, closed = free_port(), free_port()
    path = counter_recipe(recipe, port, exercise=f'{{http: "POST http://127.0.0.1:{closed}/count"}}')
    [res] = build(path, store=store)
    snap = res.steps["snap"]
    assert snap.status == "failed" and f"POST http://127.0.0.1:{closed}/count got no answer" in snap.error
    assert "internal error" not in snap.error
    assert port_free(port) and no_server_left("counter_server.py")


def test_log_probe_restores_on_a_fresh_node_and_cold_boots_wait_for_their_own_line(recipe, store, tmp_path):
    port = free_port()
    path = counter_recipe(recipe, port, ready='log: "^listening"',
                          exercise=f'{{http: "POST http://127.0.0.1:{port}/count", repeat: 2}}')
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    spec = load_runtime(store, "counter:v1")["server"]
    log = Path(spec["run_dir"]) / "server.log"
    log.unlink()  # a node where this snapshot never ran: the start-up line is not in its log
    node = Store(tmp_path / "node")
    reg = f"file://{store.home / 'registry'}"
    out = run("counter:v1", registry=reg, store=node, fallback="fail")
    try:
        assert out["mode"] == "restore"
        assert post(port, "/count")["count"] == 3, "the warm-up's two calls, then this one"
    finally:
        stop(out["pid"])
    cold = run("counter:v1", registry=reg, store=node, mode="cold")
    try:  # the old run's lines are in the log; this boot must still wait for its own
        assert post(port, "/count")["count"] == 1
    finally:
        stop(cold["pid"])


OUTSIDE_PEER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
time.sleep(600)
"""


def test_failed_dump_shows_criu_reason(recipe, store, tmp_path):
    sock_path = tmp_path / "outside.sock"
    # The peer is a process of its own, blocked in accept(): a thread of this process
    # might accept only after the scan (the build runs here too), and a connection
    # still waiting in the backlog is held by no process.
    outside = subprocess.Popen([sys.executable, "-c", OUTSIDE_PEER, str(sock_path)], stdout=subprocess.PIPE)
    assert outside.stdout.readline() == b"listening\n"
    port = free_port()
    try:
        [res] = build(counter_recipe(recipe, port, extra_args=f"--connect-unix {sock_path}"), store=store)
    finally:
        outside.kill()
        outside.wait()
    snap = res.steps["snap"]
    # named by the scan before the dump (runtime.carriable); CRIU's own reasons: test_io_uring.py
    assert snap.status == "failed" and "holds a unix socket connected to a process outside its tree" in snap.error
    assert res.steps["server"].status == "built", "the warm-up itself worked; the dump failed"
    assert port_free(port) and no_server_left("counter_server.py")


def test_missing_criu_names_the_setup_command(run_cli, recipe):
    path = counter_recipe(recipe, free_port())
    r = run_cli("plan", path, env={"SNAPBUILD_CRIU": "/nonexistent/criu"})
    assert r.code == 3 and "steps -> snap" in r.err and "ci/install-criu.sh" in r.err


def test_cached_checkpoint_does_not_start_the_server(recipe, store):
    from snapbuild.build import plan

    port = free_port()
    path = counter_recipe(recipe, port)
    build(path, store=store)
    [again] = build(path, store=store)
    assert {r.status for r in again.steps.values()} == {"cached"}
    path.write_text(path.read_text().replace("repeat: 2", "repeat: 5"))
    [p] = plan(path, store=store)
    got = {n: (s.action, s.reason) for n, s in p.steps.items()}
    assert got["server"] == ("run", "needed by snap"), "the warm-up runs only for its checkpoint"
    assert got["snap"] == ("run", "input server changed")


def hold_pid(pid: int) -> subprocess.Popen:
    """A process of this machine that holds ``pid`` (the next PID set through
    ns_last_pid, retried when another fork takes it first)."""
    for _ in range(100):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        p = subprocess.Popen(["sleep", "120"])
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    raise AssertionError(f"could not take PID {pid}")


def test_a_snapshot_restores_while_its_pids_are_taken_here(recipe, store):
    """A host-process checkpoint restores in a PID namespace of its own
    (runtime/pidns.py): processes of this machine that hold its PIDs (in the wild a
    kernel worker thread, which once failed vLLM's restore with "Unable to create a
    thread: -17") are no obstacle, and stopping it stops the namespace's PID 1 too."""
    port = free_port()
    build(counter_recipe(recipe, port), store=store)
    squatters = [hold_pid(p) for p in load_runtime(store, "counter:v1")["pids"]]
    try:
        out = run("counter:v1", store=store, fallback="fail")
        try:
            assert out["mode"] == "restore", out
            assert process.ns_pid(out["pid"]) == squatters[0].pid != out["pid"], "its own PID, in its namespace"
            assert post(port, "/count")["count"] == 3
            keeper = process._ppid(out["pid"])
        finally:
            stop(out["pid"])
    finally:
        for p in squatters:
            p.kill()
            p.wait()
    assert process.wait_gone([out["pid"], keeper], timeout=5), "the server, and the PID 1 that kept it, are gone"


def test_a_hung_criu_is_killed_at_its_time_limit_and_the_server_boots_cold(recipe, store, tmp_path, monkeypatch):
    """A stand-in criu that answers --version and check like the real one but hangs on
    restore (as a wedged kernel call would): the runner kills it after
    SNAPBUILD_CRIU_TIMEOUT and boots the server cold, saying why."""
    port = free_port()
    build(counter_recipe(recipe, port), store=store)
    real = shutil.which("criu") or "/usr/local/sbin/criu"
    hung = tmp_path / "criu"
    hung.write_text(f"#!/bin/sh\nif [ \"$1\" = restore ]; then sleep 600; fi\nexec {real} \"$@\"\n")
    hung.chmod(0o755)
    monkeypatch.setenv("SNAPBUILD_CRIU", str(hung))
    monkeypatch.setenv("SNAPBUILD_CRIU_TIMEOUT", "3")
    out = run("counter:v1", store=store)
    try:
        assert out["mode"] == "cold", out
        assert out["reason"].startswith("restore failed: criu restore did not finish within 3 s"), out["reason"]
        assert post(port, "/count")["count"] == 1, "a cold server, serving"
        assert no_server_left("sleep 600"), "the hung criu's children were killed with it"
    finally:
        stop(out["pid"])


def test_runner_cli_restore_and_stop(run_cli, recipe, store):
    port = free_port()
    build(counter_recipe(recipe, port), store=store)
    r = run_cli("restore", "counter:v1", "--json", tool="snapbuild-runner")
    assert r.code == 0, r
    out = r.json()
    assert out["mode"] == "restore" and post(port, "/count")["count"] == 3
    assert run_cli("stop", str(out["pid"]), tool="snapbuild-runner").code == 0
    assert port_free(port)
    r = run_cli("logs", "counter:v1", "-n", "2", tool="snapbuild-runner")
    last = r.out.splitlines()
    assert r.code == 0 and "GET /healthz" in last[0] and "POST /count" in last[1], \
        "after the restore, the readiness probe and the query were logged to the same file"
    r = run_cli("run", "counter:v1")  # the same through snapbuild
    pid = int(r.out.split("pid ")[1].split(",")[0]) if "pid " in r.out else None
    try:
        assert r.code == 0 and "restored: pid" in r.out, r
    finally:
        assert pid is None or run_cli("stop", str(pid), tool="snapbuild-runner").code == 0
    # a fallback is never silent: the cold boot is a WARNING with its reason on stderr
    r = run_cli("run", "counter:v1", "--fallback", "cold", "--json", env={"SNAPBUILD_CRIU": "/nonexistent/criu"})
    try:
        assert r.code == 0 and r.json()["mode"] == "cold", r
        assert "WARNING counter:v1: not restored (host engine unusable here: SNAPBUILD_CRIU=/nonexistent/criu" \
            in r.err, r
    finally:
        assert run_cli("stop", str(r.json()["pid"]), tool="snapbuild-runner").code == 0


def test_node_gc_keeps_what_pinned_snapshots_use(recipe, store, tmp_path, monkeypatch):
    from snapbuild.runtime.gc import node_gc

    port = free_port()
    path = counter_recipe(recipe, port)
    build(path, store=store)
    node = Store(tmp_path / "node")
    reg = f"file://{store.home / 'registry'}"
    stop(run("counter:v1", registry=reg, store=node)["pid"])
    run_root = Path(os.environ["SNAPBUILD_RUN_ROOT"])
    images = Path(os.environ["SNAPBUILD_IMAGE_CACHE"])
    kept = sorted(p.name for p in (run_root / "trees").iterdir())
    other = tmp_path / "other-store"
    other.mkdir()

    def tree(hexchar: str, users: list[Path]) -> Path:
        t = run_root / "trees" / (hexchar * 64)
        t.mkdir()
        (t / "f").write_bytes(b"x" * 1000)
        (t / ".snapbuild-complete").write_text("".join(f"{u}\n" for u in users))
        return t

    stale = tree("0", [node.home])  # written out for this store, used by no pin
    foreign = tree("1", [other])  # another store's: not this store's to remove
    shared = tree("2", [node.home, other])
    r = node_gc(node)
    assert r["trees_removed"] == 1 and not stale.exists()
    assert r["tree_bytes_freed"] == 1000 + len(f"{node.home}\n"), "the file and the marker"
    assert foreign.exists() and shared.exists()
    assert (shared / ".snapbuild-complete").read_text() == f"{other}\n", "this store let go of the shared tree"
    assert sorted(p.name for p in (run_root / "trees").iterdir()) == sorted(kept + ["1" * 64, "2" * 64])
    assert any((images / "trees").iterdir()), "the pinned checkpoint's images stay"
    out = run("counter:v1", registry=reg, store=node)  # still restorable, nothing refetched
    try:
        assert out["mode"] == "restore"
    finally:
        stop(out["pid"])


def test_doctor_reports_criu_and_fails_without_it(run_cli):
    r = run_cli("doctor", "--json")
    assert r.code == 0, r
    criu = next(c for c in r.json()["checks"] if c["name"] == "criu")
    assert criu["works"] and criu["version"] >= "4.2"
    r = run_cli("doctor", env={"SNAPBUILD_CRIU": "/nonexistent/criu"})
    assert r.code == 1, r
    line = next(ln for ln in r.out.splitlines() if ln[5:].startswith("criu "))
    assert line.startswith("--") and "SNAPBUILD_CRIU=/nonexistent/criu" in line, r.out
    assert "ci/install-criu.sh" in r.out


def test_a_snapshot_the_node_holds_is_checked_once_not_on_every_restore(recipe, store, tmp_path, monkeypatch):
    """Validated when it enters the node's store, trusted after: a second restore reads
    no tree document and runs no check (counted, not timed); a node that tightens its
    tree limits checks it again."""
    import snapbuild.store.snapshot as snapshot_mod

    port = free_port()
    build(counter_recipe(recipe, port), store=store)
    node = Store(tmp_path / "node")
    reg = f"file://{store.home / 'registry'}"
    calls = []
    for name in ("tree_layers_problem", "load_tree"):
        real = getattr(snapshot_mod, name)
        monkeypatch.setattr(snapshot_mod, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                          _real(*a, **k))[1])

    def restore_and_stop() -> list[str]:
        calls.clear()
        out = run("counter:v1", registry=reg, store=node, fallback="fail")
        try:
            assert out["mode"] == "restore" and post(port, "/count")["count"] >= 3
        finally:
            stop(out["pid"])
        return list(calls)

    assert "tree_layers_problem" in restore_and_stop(), "the first restore checks what it pulled"
    assert restore_and_stop() == [], "the node holds it, checked: nothing is read or checked again"
    monkeypatch.setenv("SNAPBUILD_TREE_LIMITS", "depth=64")
    assert "tree_layers_problem" in restore_and_stop(), "tighter limits: checked again"
