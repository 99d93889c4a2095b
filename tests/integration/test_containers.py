"""Containers with the real Docker engine, runc and CRIU: image layers, a container
checkpoint, restores on a clean node, side by side, and the faults around them.

Needs root, dockerd, runc and CRIU >= 4.2 (ci/setup.sh installs them); the base root
filesystem comes from ci/make-rootfs.sh (cached on disk by its package list).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from snapbuild.build import build
from snapbuild.runner.restore import run, stop
from snapbuild.runtime import erofs
from snapbuild.store import Store

from testkit import free_port, huge_pages, post  # tests/integration/testkit.py

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "recipes" / "examples"
COUNTER = Path(__file__).parent / "data" / "counter_server.py"




def leftovers(prefix: str) -> list[str]:
    """Containers and network namespaces with this name prefix still on the machine."""
    runc = subprocess.run(["runc", "list", "-q"], capture_output=True, text=True).stdout.split()
    netns = [ln.split()[0] for ln in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                   text=True).stdout.splitlines() if ln.strip()]
    return [n for n in runc + netns if n.startswith(prefix)]


def test_container_numpy_restores_on_a_clean_node_side_by_side(base_rootfs, dockerd, project, tmp_path, run_cli):
    shutil.copy(EXAMPLES / "container-numpy.yaml", project)
    shutil.copytree(EXAMPLES / "numpy-server", project / "numpy-server")
    port = free_port()
    r = run_cli("build", project / "container-numpy.yaml", "--set", f"rootfs={base_rootfs}", "--set",
                f"port={port}", "--progress", "plain", timeout=600)
    assert r.code == 0, r
    assert leftovers("sb-container-numpy") == [], "the warm-up container is gone after the checkpoint"

    # A clean node: only the registry is left of the build machine; no store, no caches.
    home = Path(os.environ["SNAPBUILD_HOME"])
    registry = tmp_path / "registry"
    shutil.move(str(home / "registry"), registry)
    shutil.rmtree(home)
    for var in ("SNAPBUILD_RUN_ROOT", "SNAPBUILD_IMAGE_CACHE"):
        shutil.rmtree(os.environ[var], ignore_errors=True)
    reg = f"file://{registry}"
    # Signed, and the node's policy trusts the key: only then are tree images mounted.
    assert run_cli("keygen", tmp_path / "ci.key").code == 0
    assert run_cli("sign", "container-numpy:dev", "--key", tmp_path / "ci.key", "--registry", reg).code == 0
    (tmp_path / "policy.json").write_text(json.dumps({"snapshots": {"container-numpy": [str(tmp_path / "ci.key.pub")]}}))
    node = {"SNAPBUILD_HOME": str(tmp_path / "node"), "SNAPBUILD_TRUST_POLICY": str(tmp_path / "policy.json")}

    p1, p2 = free_port(), free_port()
    started = []
    try:
        for p in (p1, p2):
            r = run_cli("restore", "container-numpy:dev", "--registry", reg, "--publish", str(p), "--json",
                        tool="snapbuild-runner", env=node)
            assert r.code == 0, r
            started.append(r.json())
        assert [s["mode"] for s in started] == ["restore", "restore"], started
        # The base layer (a Debian root, thousands of files) came as an EROFS image, mounted.
        assert started[0]["tree_images"] == "used", started[0]
        layers = Path(os.environ["SNAPBUILD_RUN_ROOT"]) / "layers"
        assert any(erofs.is_image_mount(p) for p in layers.iterdir() if len(p.name) == 64)
        a, b = post(p1, "/infer"), post(p2, "/infer")
        assert a["calls"] == b["calls"] == 4, "the warm-up's 3 calls, then this one: warm state came back"
        assert a["digest"] == b["digest"]
    finally:
        for s in started:
            assert run_cli("stop", s["container"], tool="snapbuild-runner", env=node).code == 0
    assert leftovers("sb-container-numpy") == []

    os.environ["SNAPBUILD_HOME"] = node["SNAPBUILD_HOME"]  # the fallback path on the same node
    cold = run("container-numpy:dev", registry=reg, mode="cold", publish=str(p1))
    try:
        answer = post(p1, "/infer")
        assert answer["calls"] == 1 and answer["digest"] == a["digest"], "a cold boot computes the same"
    finally:
        stop(cold["container"])
    assert leftovers("sb-container-numpy") == []


def image_recipe(recipe, base_rootfs: Path, run: str = "mkdir -p /data && echo hi > /data/x") -> Path:
    return recipe(f"""
        name: img
        steps:
          base: {{kind: image, from: "rootfs:{base_rootfs}"}}
          app:
            kind: image
            from: base
            copy: {{"srv/": /srv/}}
            env: {{GREETING: hello}}
            workdir: /srv
            run: ["{run}"]
    """)


def test_two_builds_of_one_recipe_give_identical_image_digests(base_rootfs, dockerd, recipe, project, tmp_path):
    (project / "srv").mkdir()
    (project / "srv" / "app.py").write_text("print('hi')\n")
    path = image_recipe(recipe, base_rootfs)
    [one] = build(path, store=Store(tmp_path / "a"))
    [two] = build(path, store=Store(tmp_path / "b"))
    assert one.ok and two.ok, {n: r.error for n, r in one.steps.items()}
    assert one.steps["app"].artifact == two.steps["app"].artifact
    assert one.steps["base"].artifact == two.steps["base"].artifact


def test_a_failing_dockerfile_shows_its_output(base_rootfs, dockerd, recipe, project, store):
    (project / "srv").mkdir()
    [res] = build(image_recipe(recipe, base_rootfs, run="echo boom-from-run >&2; exit 3"), store=store)
    app = res.steps["app"]
    assert app.status == "failed" and "the Dockerfile failed" in app.error, app.error
    assert "boom-from-run" in app.log_tail


def test_image_step_errors_are_clear(recipe, project, store, run_cli, tmp_path, monkeypatch):
    path = recipe("""
        name: img
        steps:
          base: {kind: image, from: "rootfs:missing.tar"}
    """)
    r = run_cli("plan", path)
    assert r.code == 3 and "missing.tar does not exist" in r.err and "mmdebstrap" in r.err, r

    # An archive whose layer writes outside the root is refused while it is read.
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as t:
        info = tarfile.TarInfo("../../etc/cron.d/evil")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    archive = project / "evil.tar"
    with tarfile.open(archive, "w") as t:
        for name, data in (("layer.tar", evil.getvalue()),
                           ("config.json", b'{"config": {}}'),
                           ("manifest.json", b'[{"Config": "config.json", "Layers": ["layer.tar"]}]')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    path = recipe("""
        name: img
        steps:
          base: {kind: image, from: "docker-archive:evil.tar"}
    """)
    [res] = build(path, store=store)
    assert res.steps["base"].status == "failed"
    assert "'../../etc/cron.d/evil' points outside the root filesystem" in res.steps["base"].error

    # Instructions need the Docker engine; when it is not there, say how to start it.
    (project / "root.tar").write_bytes(evil.getvalue()[:0] + _tiny_rootfs())
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    path = recipe("""
        name: img
        steps:
          base: {kind: image, from: "rootfs:root.tar"}
          app: {kind: image, from: base, run: ["true"]}
    """)
    [res] = build(path, store=store)
    app = res.steps["app"]
    assert app.status == "failed" and "is not running or not reachable" in app.error
    assert "dockerd --bridge=none --iptables=false" in (app.hint or "")


def _tiny_rootfs() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("etc")
        info.type = tarfile.DIRTYPE
        t.addfile(info)
    return buf.getvalue()


def counter_container(recipe, project: Path, base_rootfs: Path, name: str, port: int, *,
                      command: str | None = None, engine: str = "runc", exercise: str | None = None,
                      checkpoint: str = "") -> Path:
    """A recipe: the counter server in a container on the Debian base, checkpointed."""
    (project / "app").mkdir(exist_ok=True)
    shutil.copy(COUNTER, project / "app" / "counter_server.py")
    command = command or f'[python3, /app/counter_server.py, --port, "{port}"]'
    return recipe(f"""
        name: {name}
        steps:
          base: {{kind: image, from: "rootfs:{base_rootfs}"}}
          app: {{kind: image, from: base, copy: {{"app/": /app/}}}}
          server:
            kind: warmup
            image: app
            command: {command}
            ready: {{http: "http://127.0.0.1:{port}/healthz", timeout: 60}}
            exercise: [{exercise if exercise is not None else '{http: "POST /count", repeat: 2}'}]
          snap: {{kind: checkpoint, process: server, engine: {engine}{checkpoint}}}
        publish: {{tag: "{name}:v1"}}
    """)


def test_restore_with_a_file_missing_from_the_rootfs_boots_cold_and_says_why(base_rootfs, dockerd, recipe,
                                                                              project, store):
    port = free_port()
    hold = ("import os, runpy, sys; held = [open(p) for p in ['/app/held.txt'] if os.path.exists(p)]; "
            f"sys.argv = ['counter_server.py', '--port', '{port}']; "
            "runpy.run_path('/app/counter_server.py', run_name='__main__')")
    (project / "app").mkdir()
    (project / "app" / "held.txt").write_text("the server keeps this open\n")
    path = counter_container(recipe, project, base_rootfs, "held", port, command=f'[python3, -c, "{hold}"]')
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    # Take the file out of this node's unpacked copy of the app layer.
    layers = Path(os.environ["SNAPBUILD_RUN_ROOT"]) / "layers"
    held = [p for p in layers.glob("*/app/held.txt")]
    assert held, "the app layer is unpacked on this machine"
    for p in held:
        p.unlink()
    out = run("held:v1", store=store)
    try:
        assert out["mode"] == "cold"
        assert out["reason"].startswith("restore failed: runc restore failed"), out["reason"]
        assert "held.txt" in out["reason"], "the reason names the missing file"
        assert post(port, "/count")["count"] == 1
    finally:
        stop(out["container"])
    assert leftovers("sb-held") == []


def test_a_restored_container_is_checked_by_its_verify_requests(base_rootfs, dockerd, recipe, project, store):
    port = free_port()
    (project / "app").mkdir()
    (project / "app" / "answer.txt").write_text("token 17")
    path = counter_container(recipe, project, base_rootfs, "verified", port, checkpoint=', verify: [{http: "GET /answer"}]',
                             command=f'[python3, /app/counter_server.py, --port, "{port}", --answer-file, /app/answer.txt]')
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    out = run("verified:v1", store=store, publish="0")
    try:
        assert out["mode"] == "restore" and out["verify"] == "same", out
    finally:
        stop(out["container"])
    for p in Path(os.environ["SNAPBUILD_RUN_ROOT"]).glob("layers/*/app/answer.txt"):
        p.write_text("token 18")  # the node's copy of the layer no longer gives the warm answer
    out = run("verified:v1", store=store, publish="0")
    try:
        assert out["mode"] == "cold" and out["verify"] == "different", out
        assert out["reason"].startswith("restored server answered the check request differently"), out["reason"]
        assert "'token 18'" in out["reason"] and "'token 17'" in out["reason"]
    finally:
        stop(out["container"])
    assert leftovers("sb-verified") == [], "the restored container was removed before the cold boot"


def test_runc_hands_criu_the_huge_page_fill(base_rootfs, dockerd, recipe, project, store, monkeypatch):
    """runc starts CRIU itself: ``--thp-fill`` reaches it through the bundle's CRIU
    config file, and the container's server comes back with its 64 MiB in huge pages."""
    from snapbuild.engines import criu

    if not criu.has_thp_fill(criu.binary()) or criu.thp_mode() != "madvise":
        pytest.skip("needs a criu with --thp-fill (ci/criu-patches) and transparent huge pages in madvise mode, "
                    "where a cold process gets none")
    port = free_port()
    (project / "app").mkdir()
    shutil.copy(Path(__file__).parent / "data" / "memory_server.py", project / "app")
    path = counter_container(recipe, project, base_rootfs, "thp", port, exercise='{http: "GET /digest"}',
                             checkpoint=', verify: [{http: "GET /digest"}]',
                             command=f'[python3, /app/memory_server.py, --port, "{port}", --mib, "64"]')
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    for setting, want in (("on", "used"), ("off", "not used: SNAPBUILD_THP_FILL=off")):
        monkeypatch.setenv("SNAPBUILD_THP_FILL", setting)
        out = run("thp:v1", store=store, publish="0")
        try:
            assert out["mode"] == "restore" and out["verify"] == "same" and out["thp_fill"] == want, out
            huge, _ = huge_pages(out["pid"])
            assert (huge >= 48 << 20) if setting == "on" else huge == 0, f"{setting}: {huge >> 20} MiB huge"
        finally:
            stop(out["container"])


@pytest.mark.skipif(shutil.which("runsc") is None,
                    reason="gVisor's runsc is not installed; it cannot be installed on these machines")
def test_runsc_container_restores_with_its_state(base_rootfs, dockerd, recipe, project, store):
    port = free_port()
    path = counter_container(recipe, project, base_rootfs, "gv", port, engine="runsc")
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    out = run("gv:v1", store=store, fallback="fail", publish=str(free_port()))
    try:
        assert post(int(out["address"].rsplit(":", 1)[1]), "/count")["count"] == 3
    finally:
        stop(out["container"])


def test_bases_from_archives_and_the_engine_keep_the_layers(base_rootfs, dockerd, recipe, project, store,
                                                            tmp_path, run_cli):
    """An image exported as a docker archive, converted to an OCI archive by skopeo, and
    loaded into the Docker engine comes back with the same layer digests from each."""
    from snapbuild.image import docker as engine
    from snapbuild.image.layers import write_docker_archive
    from snapbuild.image.layers import write_layers
    from snapbuild.runtime.container import read_image

    (project / "srv").mkdir()
    (project / "srv" / "app.py").write_text("print('hi')\n")
    [res] = build(image_recipe(recipe, base_rootfs), store=store)
    meta = read_image(store.blobs, res.steps["app"].artifact)[0]
    config, layers = write_layers(store.blobs, res.steps["app"].artifact, tmp_path / "layers")
    with open(project / "app-docker.tar", "wb") as f:
        write_docker_archive(f, config, layers, "localtest/app:1")
    subprocess.run(["skopeo", "copy", "--quiet", "docker-archive:app-docker.tar", "oci-archive:app-oci.tar"],
                   cwd=project, check=True)
    engine.load(engine.client(), project / "app-docker.tar")

    path = recipe("""
        name: bases
        steps:
          from-docker-archive: {kind: image, from: "docker-archive:app-docker.tar"}
          from-oci-archive: {kind: image, from: "oci-archive:app-oci.tar"}
          from-engine: {kind: image, from: "docker://localtest/app:1"}
    """)
    [got] = build(path, store=store)
    assert got.ok, {n: r.error for n, r in got.steps.items()}
    want = [x["digest"] for x in meta["layers"]]
    for step in ("from-docker-archive", "from-oci-archive", "from-engine"):
        assert [x["digest"] for x in read_image(store.blobs, got.steps[step].artifact)[0]["layers"]] == want, step
    r = run_cli("plan", path)  # localtest/ is no registry: the engine's own image, and a warning that says so
    assert r.code == 0 and "WARNING docker pull localtest/app:1 failed (" in r.err, r
    assert "pinning the Docker engine's local image of that name instead" in r.err

    missing = recipe("""
        name: bases
        steps:
          base: {kind: image, from: "docker://localtest/no-such-image:1"}
    """)
    r = run_cli("plan", missing)
    assert r.code == 3 and "no such image, and it could not be pulled" in r.err, r


def test_node_gc_lets_go_of_unpacked_layers_no_pin_uses(base_rootfs, dockerd, recipe, project, store, tmp_path):
    from snapbuild.runtime.gc import node_gc

    path = counter_container(recipe, project, base_rootfs, "gc", free_port(), exercise="")
    [res] = build(path, store=store)
    assert res.ok, {n: r.error for n, r in res.steps.items()}
    node = Store(tmp_path / "node")
    stop(run("gc:v1", registry=f"file://{store.home / 'registry'}", store=node, fallback="fail")["container"])
    layers = Path(os.environ["SNAPBUILD_RUN_ROOT"]) / "layers"
    kept = sorted(p.name for p in layers.iterdir() if p.is_dir() and len(p.name) == 64)
    assert len(kept) == 2, "the base and the app layer"
    stale = layers / ("f" * 64)
    stale.mkdir()
    (stale / "x").write_bytes(b"y" * 100)
    (layers / ("f" * 64 + ".snapbuild-layer-complete-v2")).write_text(f"{node.home}\n")
    r = node_gc(node)
    assert not stale.exists() and r["trees_removed"] >= 1
    assert sorted(p.name for p in layers.iterdir() if p.is_dir() and len(p.name) == 64) == kept, \
        "the pinned snapshot's layers stay"


def test_a_registry_base_is_pulled_and_pinned_to_its_digest(base_rootfs, dockerd, oci_registry, recipe, project,
                                                             store, tmp_path):
    """docker://REF from a real registry on 127.0.0.1: pulled at plan time, pinned to its
    repository digest, and its layers come back as pushed."""
    from snapbuild.image import docker as engine
    from snapbuild.image.layers import write_docker_archive
    from snapbuild.image.layers import write_layers
    from snapbuild.runtime.container import read_image

    [res] = build(recipe(f"""
        name: base
        steps:
          base: {{kind: image, from: "rootfs:{base_rootfs}"}}
    """), store=store)
    config, [x] = write_layers(store.blobs, res.steps["base"].artifact, tmp_path / "layers")
    ref = f"{oci_registry}/snapbuild/base:1"
    with open(tmp_path / "image.tar", "wb") as f:
        write_docker_archive(f, config, [x], ref)
    c = engine.client()
    engine.load(c, tmp_path / "image.tar")
    for line in c.api.push(ref, stream=True, decode=True):
        assert "error" not in line, line
    c.api.remove_image(ref, force=True)  # only the registry has it now

    path = recipe(f"""
        name: pulled
        steps:
          base: {{kind: image, from: "docker://{ref}"}}
    """)
    from snapbuild.build import plan

    [p] = plan(path, store=store)
    pin = p.steps["base"].material["pins"]["from"]
    assert pin["repo_digest"].startswith(f"{oci_registry}/snapbuild/base@sha256:"), pin
    [got] = build(path, store=store)
    assert got.ok, got.steps["base"].error
    assert [y["digest"] for y in read_image(store.blobs, got.steps["base"].artifact)[0]["layers"]] == [x.digest]


def test_run_exercises_run_inside_the_container(base_rootfs, dockerd, recipe, project, store):
    port = free_port()
    # /snapbuild/run exists only in the container, and the counter only counts there.
    line = f"python3 -c \\\"import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:{port}/count', data=b'x'))\\\" && echo ran > /snapbuild/run/exercised"
    path = counter_container(recipe, project, base_rootfs, "ex", port, exercise=f'{{run: "{line}", repeat: 2}}')
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    out = run("ex:v1", store=store, fallback="fail", publish=str(free_port()))
    try:
        assert post(int(out["address"].rsplit(":", 1)[1]), "/count")["count"] == 3
    finally:
        stop(out["container"])


def test_a_file_capability_set_in_an_image_survives_a_node_unpacking_its_layer(recipe, project, store, tmp_path):
    """ping's cap_net_raw, as `setcap cap_net_raw+ep` leaves it in a root filesystem tar
    (a SCHILY.xattr pax header): the image step keeps it in its layer, and a node that
    unpacks the layer restores it (real image step, real unpack; no Docker needed)."""
    from snapbuild.build import build
    from snapbuild.runtime.container import layer_dirs

    cap = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
    root_tar = project / "root.tar"
    with tarfile.open(root_tar, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin",):
            d = tarfile.TarInfo(name)
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(d)
        info = tarfile.TarInfo("bin/ping")
        info.size, info.mode = 4, 0o755
        info.pax_headers = {"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")}
        tar.addfile(info, io.BytesIO(b"\x7fELF"))
    path = recipe(f'name: caps\nsteps:\n  base: {{kind: image, from: "rootfs:{root_tar}"}}\n')
    [res] = build(path, store=store)
    assert res.ok, res.steps["base"].error
    [layer] = layer_dirs(store.blobs, res.steps["base"].artifact, tmp_path / "node-layers")
    assert os.getxattr(layer / "bin" / "ping", "security.capability") == cap
    assert os.stat(tmp_path / "node-layers").st_mode & 0o777 == 0o700, "only root may reach a capability binary"


def test_a_runc_gpu_container_gets_exactly_its_gpus_from_the_cdi_spec(base_rootfs, dockerd, recipe, project, store,
                                                                       tmp_path, monkeypatch):
    """engine: runc with gpu: cuda on a stand-in node (tests/integration/fakenvidia.py:
    two H200s under driver r580, their device nodes and an nvidia-ctk-shaped CDI spec;
    no real GPU here). The warm-up container gets GPU 0's devices from the spec; a
    restore onto GPU 1 finds the checkpoint's /dev with GPU 0's node, which is replaced
    by GPU 1's, and its CUDA state goes there with the device map; a cold boot on GPU 1
    sees GPU 1 only."""
    import fakenvidia
    from snapbuild.store.snapshot import load_config, parse_manifest

    folder = tmp_path / "nvidia"
    monkeypatch.setenv("PATH", f"{fakenvidia.install(folder, fakenvidia.h200s(2))}{os.pathsep}{os.environ['PATH']}")
    gpu0, gpu1 = [row.split(", ")[2] for row in fakenvidia.h200s(2).splitlines()]
    cdi_dir, _ = fakenvidia.fake_cdi(folder, [gpu0, gpu1])
    monkeypatch.setenv("SNAPBUILD_CDI_DIRS", str(cdi_dir))
    port = free_port()
    (project / "app").mkdir()
    shutil.copy(fakenvidia.fake_libcuda(folder), project / "app" / "libcuda.so.1")
    path = counter_container(recipe, project, base_rootfs, "gpubox", port, checkpoint=", gpu: cuda",
                             command=f'[python3, /app/counter_server.py, --port, "{port}", --weights, '
                                     '/app/libcuda.so.1]')
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    gpu = load_config(store.blobs, parse_manifest(store.blobs.get(res.snapshot), res.snapshot))["runtime"]["gpu"]
    assert gpu["pid_ns"] and gpu["uuids"] == [gpu0] and "/dev/nvidia0" in gpu["device_nodes"], gpu

    def devices(cid: str) -> list[str]:
        r = subprocess.run(["runc", "exec", cid, "ls", "/dev"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return sorted(n for n in r.stdout.split() if n.startswith("nvidia"))

    out = run("gpubox:v1", store=store, gpus=["1"], publish="0", fallback="fail")
    try:
        assert out["mode"] == "restore" and out["gpus"] == [gpu1] and out["device_map"] == {gpu0: gpu1}, out
        assert devices(out["container"]) == ["nvidia-uvm", "nvidia1", "nvidiactl"], "GPU 1's node, not GPU 0's"
        [restore] = [c for c in fakenvidia.calls(folder) if c.startswith("--action restore")]
        assert restore.endswith(f"--device-map {gpu0}={gpu1}"), restore
        assert post(int(out["address"].rsplit(":", 1)[1]), "/count")["count"] == 3
    finally:
        stop(out["container"])
    cold = run("gpubox:v1", store=store, gpus=["1"], publish="0", mode="cold")
    try:
        assert devices(cold["container"]) == ["nvidia-uvm", "nvidia1", "nvidiactl"]
        assert post(int(cold["address"].rsplit(":", 1)[1]), "/count")["count"] == 1
    finally:
        stop(cold["container"])
    assert leftovers("sb-gpubox") == []


def test_a_container_takes_env_from_node_values_from_the_runner(base_rootfs, dockerd, recipe, project, store,
                                                                 monkeypatch):
    """`env_from_node`: the warm-up container gets the build's value, a cold boot's
    container and a restore's `after_restore` lines (runc exec) the node's; a restored
    server keeps what it read at the warm-up. The value is in no JSON of the snapshot,
    and on the node only in the bundle's config.json, which only root reads."""
    import stat
    import urllib.request

    from test_secrets import BUILD_DB, ENV_SERVER, NODE_DB

    port = free_port()
    (project / "app").mkdir()
    (project / "app" / "env_server.py").write_text(ENV_SERVER)
    path = counter_container(recipe, project, base_rootfs, "envnode", port, exercise="",
                             command=f'[python3, /app/env_server.py, --port, "{port}"]',
                             checkpoint=", after_restore: [{run: 'echo \"$DATABASE_URL\" > /snapbuild/run/seen'}]")
    path.write_text(path.read_text().replace("image: app\n", "image: app\n    env_from_node: [DATABASE_URL]\n"))
    monkeypatch.setenv("DATABASE_URL", BUILD_DB)
    [res] = build(path, store=store)
    assert res.ok, {n: (r.error, r.log_tail) for n, r in res.steps.items()}
    manifest = json.loads(store.blobs.get(res.snapshot))
    assert BUILD_DB.encode() not in store.blobs.get(manifest["config"]["digest"])

    def asked(p: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{p}/", timeout=5) as a:
            return json.loads(a.read())["database_url"]

    monkeypatch.setenv("DATABASE_URL", NODE_DB)
    published = free_port()
    out = run("envnode:v1", store=store, fallback="fail", publish=str(published))
    try:
        assert asked(published) == BUILD_DB, "the restored server keeps what its warm-up read"
        assert (Path(out["log"]).parent / "seen").read_text().strip() == NODE_DB, "after_restore ran with the node's"
        bundle = Path(os.environ["SNAPBUILD_RUN_ROOT"]) / "bundles" / out["container"] / "config.json"
        assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    finally:
        stop(out["container"])
    cold = run("envnode:v1", store=store, mode="cold", publish=str(published))
    try:
        assert asked(published) == NODE_DB, "a cold boot's container gets the node's value"
    finally:
        stop(cold["container"])
    assert leftovers("sb-envnode") == []
