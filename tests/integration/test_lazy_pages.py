"""Host-process restores with CRIU's lazy pages, with the real CRIU and userfaultfd: the
server runs as soon as its tree is back and its memory follows on demand from a
``criu lazy-pages`` daemon; the restore counts only once every page is in place. And
plain restores that read the memory into transparent huge pages (``criu restore
--thp-fill``, ci/criu-patches), with the real kernel's THP.

The server (data/memory_server.py) holds 256 MiB of private memory, each MiB filled
from its index, and GET /digest hashes all of it: a page lost or zeroed on the way
answers otherwise than the warm-up did.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.engines import criu
from snapbuild.errors import UsageError
from snapbuild.runner.restore import run, stop
from snapbuild.runtime.process import tree

from testkit import free_port, get, huge_pages, rollup

pytestmark = pytest.mark.integration

MEMORY_SERVER = Path(__file__).parent / "data" / "memory_server.py"

#: Stands in for criu; for ``criu lazy-pages`` it runs the real daemon and kills it as
#: soon as the restore it serves has finished, the way a daemon that crashed, ran out of
#: memory or was killed by an operator would leave a restored tree.
DAEMON_KILLER = """#!{python}
import os, subprocess, sys, time
args = sys.argv[1:]
work = args[args.index("-W") + 1] if "-W" in args else None
if args[:1] == ["restore"] and work:  # then say it is done, in its work folder
    rc = subprocess.call([{criu!r}, *args])
    open(os.path.join(work, "restore.done"), "w").close()
    sys.exit(rc)
if args[:1] != ["lazy-pages"]:
    os.execv({criu!r}, [{criu!r}, *args])
status = int(args[args.index("--status-fd") + 1])
daemon = subprocess.Popen([{criu!r}, *args], pass_fds=[status])
os.close(status)
while not os.path.exists(os.path.join(work, "restore.done")) and daemon.poll() is None:
    time.sleep(0.001)
daemon.kill()
daemon.wait()
sys.exit(1)
"""


def build_memory(recipe, store, name: str, port: int, mib: int, workers: int = 0) -> None:
    """A snapshot ``NAME:v1`` of the memory server (and its workers, ready once the last
    one answers), its check request the digest of all its memory."""
    path = recipe(f"""
        name: {name}
        steps:
          app: {{kind: files, root: app}}
          server:
            kind: warmup
            needs: [app]
            run: "{sys.executable} $SNAPBUILD_INPUTS/app/memory_server.py --port {port} --mib {mib} --workers {workers}"
            ready: {{http: "http://127.0.0.1:{port + workers}/healthz", timeout: 60}}
          snap: {{kind: checkpoint, process: server, verify: [{{http: "GET /digest"}}]}}
        publish: {{tag: "{name}:v1"}}
    """)
    (path.parent / "app").mkdir(exist_ok=True)
    shutil.copy(MEMORY_SERVER, path.parent / "app" / "memory_server.py")
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}


@pytest.fixture
def snapshot(recipe, store):
    port = free_port()
    build_memory(recipe, store, "memory", port, 256)
    yield port
    drop_images("memory:v1", store)


def drop_images(ref: str, store) -> None:
    """The snapshot's checkpoint images on the node's tmpfs (hundreds of MiB here): not
    left for the next tests."""
    from snapbuild.runner.pull import pull
    from snapbuild.runtime.layout import images_root, tree_dir

    runtime = pull(ref, store=store)["snapshot"].runtime
    shutil.rmtree(tree_dir(images_root(runtime.server.run_root), runtime.images_tree), ignore_errors=True)


def test_a_lazy_restore_answers_with_all_of_its_memory(snapshot, store):
    out = run("memory:v1", store=store, lazy_pages=True)
    try:
        assert out["mode"] == "restore" and out["lazy_pages"] == "used", out
        assert "pages_s" in out["timings"] and out["verify"] == "same", out
        digest = get(snapshot, "/digest")
    finally:
        stop(out["pid"])
    cold = run("memory:v1", store=store, mode="cold")
    try:
        assert get(snapshot, "/digest") == digest, "the lazily restored memory is the cold boot's"
    finally:
        stop(cold["pid"])


def test_lazy_pages_off_restores_every_page_first(snapshot, store):
    out = run("memory:v1", store=store, lazy_pages=False)
    try:
        assert out["mode"] == "restore" and out["lazy_pages"] is None and "pages_s" not in out["timings"], out
        assert out["verify"] == "same"
    finally:
        stop(out["pid"])


def test_a_lazy_pages_daemon_that_dies_means_a_cold_boot(snapshot, store, tmp_path, monkeypatch):
    killer = tmp_path / "criu"
    real = shutil.which("criu") or "/usr/local/sbin/criu"
    killer.write_text(DAEMON_KILLER.format(python=sys.executable, criu=real))
    killer.chmod(0o755)
    monkeypatch.setenv("SNAPBUILD_CRIU", str(killer))
    out = run("memory:v1", store=store, lazy_pages=True)
    try:
        assert out["mode"] == "cold", out
        assert "memory did not all arrive" in out["reason"] and "lazy-pages failed" in out["reason"], out
        assert get(snapshot, "/healthz") == b"ok"
    finally:
        stop(out["pid"])


def test_both_clis_take_lazy_pages_and_the_environment_sets_the_default(snapshot, store, run_cli):
    r = run_cli("restore", "memory:v1", "--lazy-pages", "off", "--json", tool="snapbuild-runner",
                env={"SNAPBUILD_LAZY_PAGES": "on"})
    assert r.code == 0, r
    stop(r.json()["pid"])
    assert r.json()["mode"] == "restore" and r.json()["lazy_pages"] is None, "the option wins over the environment"
    r = run_cli("run", "memory:v1", "--json", env={"SNAPBUILD_LAZY_PAGES": "on"})
    assert r.code == 0, r
    stop(r.json()["pid"])
    assert r.json()["lazy_pages"] == "used" and "pages_s" in r.json()["timings"], r
    r = run_cli("run", "memory:v1", env={"SNAPBUILD_LAZY_PAGES": "sometimes"})
    assert r.code == 2 and "SNAPBUILD_LAZY_PAGES must be on or off" in r.err and "Traceback" not in r.err, r


def needs_thp_fill():
    if not criu.has_thp_fill(criu.binary()):
        pytest.skip("the installed criu has no --thp-fill: ci/criu-patches did not apply to this CRIU version "
                    "(ci/install-criu.sh said so)")
    if criu.thp_mode() not in ("always", "madvise"):
        pytest.skip(f"this kernel's transparent huge pages are {criu.thp_mode() or 'absent'}")


def test_a_plain_restore_reads_memory_into_huge_pages_and_puts_the_advice_back(snapshot, store, monkeypatch):
    """SNAPBUILD_THP_FILL=on: the 256 MiB come back in 2 MiB pages, the same bytes as the
    cold boot's, and the area then advises what its faults got before the dump."""
    needs_thp_fill()
    monkeypatch.setenv("SNAPBUILD_THP_FILL", "on")
    out = run("memory:v1", store=store, lazy_pages=False)
    try:
        assert out["mode"] == "restore" and out["thp_fill"] == "used" and out["verify"] == "same", out
        huge, advice = huge_pages(out["pid"])
        assert huge >= 224 << 20, f"{huge >> 20} MiB of the 256 in huge pages"
        assert advice == ("nh" if criu.thp_mode() == "madvise" else "hg"), advice
        digest = get(snapshot, "/digest")
    finally:
        stop(out["pid"])
    monkeypatch.setenv("SNAPBUILD_THP_FILL", "off")
    out = run("memory:v1", store=store, lazy_pages=False)
    try:
        assert out["thp_fill"] == "not used: SNAPBUILD_THP_FILL=off" and out["verify"] == "same", out
        if criu.thp_mode() == "madvise":
            assert huge_pages(out["pid"]) == (0, "none"), "small pages, no advice: as without the patch"
        assert get(snapshot, "/digest") == digest
    finally:
        stop(out["pid"])


def test_lazy_restores_leave_huge_pages_out_and_say_nothing_of_them(snapshot, store, monkeypatch):
    monkeypatch.setenv("SNAPBUILD_THP_FILL", "on")
    out = run("memory:v1", store=store, lazy_pages=True)
    try:
        assert out["lazy_pages"] == "used" and "thp_fill" not in out, out
    finally:
        stop(out["pid"])


def test_the_thp_fill_setting_is_checked(snapshot, store, run_cli, monkeypatch):
    """Refused before anything is fetched, whether the restore would read memory
    plainly, lazily or not at all (a cold boot)."""
    for lazy in ("off", "on"):
        r = run_cli("restore", "memory:v1", "--lazy-pages", lazy, tool="snapbuild-runner",
                    env={"SNAPBUILD_THP_FILL": "sometimes"})
        assert r.code == 2 and "SNAPBUILD_THP_FILL must be auto, on or off, not 'sometimes'" in r.err, (lazy, r)
        assert "Traceback" not in r.err
    monkeypatch.setenv("SNAPBUILD_THP_FILL", "sometimes")
    with pytest.raises(UsageError, match="SNAPBUILD_THP_FILL must be"):
        run("memory:v1", store=store, mode="cold")


def test_a_tree_sharing_memory_copy_on_write_restores_it_in_huge_pages(recipe, store, monkeypatch):
    """A preloading server's shape: 128 MiB filled, then two workers forked that share it
    copy-on-write. CRIU maps such memory itself before it forks the tree (not in its
    restorer), so this is the patch's other path: each process answers with the warm
    digest, the parent's copy is in huge pages, the workers still share it (their
    proportional share of memory is no larger than without huge pages) and every
    process's area has its advice back."""
    needs_thp_fill()
    port = free_port()
    build_memory(recipe, store, "memtree", port, 128, workers=2)
    shares = {}
    for setting in ("off", "on"):
        monkeypatch.setenv("SNAPBUILD_THP_FILL", setting)
        out = run("memtree:v1", store=store, lazy_pages=False)
        try:
            assert out["mode"] == "restore" and out["verify"] == "same", out
            pids = tree(out["pid"])
            assert len(pids) == 3, pids
            digests = {get(port + i, "/digest") for i in range(3)}
            assert len(digests) == 1, "every process of the tree has the same memory back"
            shares[setting] = sum(rollup(p, "Pss") for p in pids)
            if setting == "on":
                huge, _ = huge_pages(out["pid"])
                assert huge >= 96 << 20, f"{huge >> 20} MiB of the parent's 128 in huge pages"
                want = "nh" if criu.thp_mode() == "madvise" else "hg"
                assert [huge_pages(p)[1] for p in pids] == [want] * 3
        finally:
            stop(out["pid"])
    drop_images("memtree:v1", store)
    assert shares["on"] < shares["off"] + (32 << 20), f"the workers share the huge pages: {shares}"
