"""runtime.cdi: reading a node's CDI specs, writing their edits into a runc config.json,
and refreshing a restored container's device nodes without following its links.

The specs and device nodes are the stand-ins of tests/integration/fakenvidia.py
(mknod: these tests run as root); the real runc is in the integration tests."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from snapbuild.runtime import cdi
from snapbuild.runtime.cdi import CdiError, Edits
from tests.integration.fakenvidia import fake_cdi

UUIDS = ["GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000010", "GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000011"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of the stand-in device nodes needs root")


@pytest.fixture
def node(tmp_path) -> tuple[Path, Path]:
    """(cdi folder, dev folder) of a stand-in node with two GPUs."""
    return fake_cdi(tmp_path / "node", UUIDS)


def write_spec(folder: Path, name: str, spec: dict, mode: int = 0o644) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    path = folder / name
    path.write_text(json.dumps(spec))
    os.chmod(path, mode)
    return path


def gpu_spec(host: Path, *names: str, env: str = "A=1") -> dict:
    return {"cdiVersion": "0.6.0", "kind": "nvidia.com/gpu", "containerEdits": {"env": [env]},
            "devices": [{"name": n, "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": str(host)}]}}
                        for n in names]}


def test_spec_dirs_are_cdi_s_unless_the_environment_names_others(monkeypatch):
    monkeypatch.delenv("SNAPBUILD_CDI_DIRS", raising=False)
    assert cdi.spec_dirs() == [Path("/etc/cdi"), Path("/var/run/cdi")]
    monkeypatch.setenv("SNAPBUILD_CDI_DIRS", f"/a{os.pathsep}/b")
    assert cdi.spec_dirs() == [Path("/a"), Path("/b")]


def test_the_registry_has_nvidia_ctk_s_devices(node, monkeypatch):
    cdi_dir, _ = node
    monkeypatch.setenv("SNAPBUILD_CDI_DIRS", f"{cdi_dir.parent / 'missing'}{os.pathsep}{cdi_dir}")
    assert cdi.load().devices() == ["0", "1", *UUIDS, "all"]
    assert cdi.load().devices("vendor.com/other") == []


def test_index_and_uuid_name_the_same_gpu_with_the_spec_s_own_edits(node):
    cdi_dir, dev = node
    reg = cdi.load([cdi_dir])
    by_index, by_uuid = reg.edits(["1"]), reg.edits([UUIDS[1]])
    assert by_index == by_uuid == reg.edits([f"nvidia.com/gpu={UUIDS[1]}"])
    assert by_index.node_paths() == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia1"]
    assert by_index.env == ["NVIDIA_VISIBLE_DEVICES=void"]
    gpu = by_index.device_nodes[-1]
    assert (gpu["type"], gpu["major"], gpu["minor"], gpu["fileMode"]) == ("c", 195, 1, 0o666)
    assert gpu["hostPath"] == str(dev / "nvidia1")
    both = reg.edits(["0", "1"])
    assert both.env == ["NVIDIA_VISIBLE_DEVICES=void"], "the spec's own edits come once"
    assert reg.edits(["all"]).node_paths() == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidia1"]


def test_a_later_folder_overrides_a_device_of_an_earlier_one(tmp_path, node):
    _, dev = node
    write_spec(tmp_path / "etc", "a.json", gpu_spec(dev / "nvidia0", "0", "x", env="FROM=etc"))
    write_spec(tmp_path / "run", "b.yaml", gpu_spec(dev / "nvidia1", "0", env="FROM=run"))
    reg = cdi.load([tmp_path / "etc", tmp_path / "run"])
    assert sorted(reg.devices()) == ["0", "x"]
    assert reg.edits(["0"]).env == ["FROM=run"] and reg.edits(["0"]).device_nodes[0]["minor"] == 1
    assert reg.edits(["x"]).env == ["FROM=etc"]


def test_a_device_in_two_files_of_one_folder_is_refused_when_asked_for(tmp_path, node):
    _, dev = node
    a = write_spec(tmp_path / "etc", "a.json", gpu_spec(dev / "nvidia0", "0"))
    b = write_spec(tmp_path / "etc", "b.json", gpu_spec(dev / "nvidia1", "0", "1"))
    reg = cdi.load([tmp_path / "etc"])
    assert reg.edits(["1"]).device_nodes[0]["minor"] == 1
    with pytest.raises(CdiError, match=f"defined both in {a} and in {b}"):
        reg.edits(["0"])


def test_a_yaml_spec_is_read(tmp_path, node):
    _, dev = node
    folder = tmp_path / "etc"
    write_spec(folder, "gpu.yml", {})
    (folder / "gpu.yml").write_text(f"cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: '0'\n"
                                    f"  containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\n"
                                    f"      hostPath: {dev / 'nvidia0'}\n")
    (folder / "notes.txt").write_text("not a spec")
    assert cdi.load([folder]).edits(["0"]).device_nodes[0]["major"] == 195


def test_without_pyyaml_a_json_spec_still_reads_and_a_yaml_one_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # the base install (a node) has no PyYAML
    as_json, _ = fake_cdi(tmp_path / "json", UUIDS, as_json=True)
    assert cdi.load([as_json]).devices() == ["0", "1", *UUIDS, "all"]
    as_yaml = tmp_path / "yaml" / "cdi"
    as_yaml.mkdir(parents=True)
    os.chmod(as_yaml, 0o755)
    (as_yaml / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices: []\n")
    with pytest.raises(CdiError, match=f"{as_yaml / 'nvidia.yaml'} is YAML, and this install has no YAML") as e:
        cdi.load([as_yaml])
    assert "--format=json" in (e.value.hint or "")


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_spec_others_may_write_is_refused(tmp_path, node, what):
    _, dev = node
    path = write_spec(tmp_path / "etc", "gpu.json", gpu_spec(dev / "nvidia0", "0"))
    os.chmod(path if what == "file" else path.parent, 0o664 if what == "file" else 0o775)
    with pytest.raises(CdiError, match="writable by group or others") as e:
        cdi.load([tmp_path / "etc"])
    assert str(path if what == "file" else path.parent) in str(e.value)
    assert "chmod go-w" in (e.value.hint or "") and e.value.exit_code == 11


def test_a_spec_another_user_owns_is_refused(tmp_path, node):
    _, dev = node
    path = write_spec(tmp_path / "etc", "gpu.json", gpu_spec(dev / "nvidia0", "0"))
    os.chown(path, 1234, 1234)
    with pytest.raises(CdiError, match=f"{path} is owned by uid 1234"):
        cdi.load([tmp_path / "etc"])


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("kind"), "kind None is not 'vendor/class'"),
    (lambda s: s.update(kind="nvidia"), "kind 'nvidia' is not 'vendor/class'"),
    (lambda s: s["devices"][0].pop("name"), r"devices\[0\] has no valid name"),
    (lambda s: s["devices"][0].pop("containerEdits"), "device '0' has no containerEdits"),
    (lambda s: s["devices"][0]["containerEdits"]["deviceNodes"][0].update(path="dev/nvidia0"),
     r"deviceNodes\[0\] needs an absolute path"),
    (lambda s: s["containerEdits"].update(mounts=[{"hostPath": "/lib/x.so", "containerPath": "lib/x.so"}]),
     r"containerEdits: mounts\[0\] needs an absolute hostPath and containerPath"),
    (lambda s: s["containerEdits"].update(hooks=[{"hookName": "createContainer", "path": "nvidia-cdi-hook"}]),
     r"hooks\[0\] \(createContainer\): path 'nvidia-cdi-hook' is not absolute"),
    (lambda s: s["containerEdits"].update(hooks=[{"hookName": "later", "path": "/bin/true"}]), "has no hookName"),
    (lambda s: s["containerEdits"].update(env=["=x"]), "env '=x' is not KEY=VALUE"),
    (lambda s: s["containerEdits"].update(netDevices=[{"name": "x"}]), "netDevices is not an edit snapbuild"),
])
def test_a_malformed_spec_is_refused_with_its_file(tmp_path, node, change, message):
    _, dev = node
    spec = gpu_spec(dev / "nvidia0", "0")
    change(spec)
    path = write_spec(tmp_path / "etc", "gpu.json", spec)
    with pytest.raises(CdiError, match=message) as e:
        cdi.load([tmp_path / "etc"])
    assert str(e.value).startswith(f"CDI spec {path}: ") and "nvidia-ctk cdi generate" in (e.value.hint or "")


def test_an_unknown_device_lists_what_the_node_has(node):
    cdi_dir, _ = node
    with pytest.raises(CdiError, match=f"no CDI device nvidia.com/gpu=7 on this node.* have 0, 1, {UUIDS[0]}") as e:
        cdi.load([cdi_dir]).edits(["7"])
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in (e.value.hint or "")


def test_a_device_whose_host_node_is_gone_says_so(tmp_path):
    write_spec(tmp_path / "etc", "gpu.json", gpu_spec(tmp_path / "gone", "0"))
    with pytest.raises(CdiError, match=f"device '0': device node /dev/nvidia0: its host node {tmp_path / 'gone'}"):
        cdi.load([tmp_path / "etc"]).edits(["0"])


def config() -> dict:
    return {"process": {"env": ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=all"], "user": {"uid": 0, "gid": 0}},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "pid"}]}}


def test_apply_writes_devices_cgroup_rules_env_mounts_hooks_and_groups(node):
    cdi_dir, _ = node
    edits = cdi.load([cdi_dir]).edits(["0"])
    edits.mounts.append({"hostPath": "/usr/lib/libcuda.so.1", "containerPath": "/usr/lib/libcuda.so.1",
                         "options": ["ro", "nosuid", "nodev", "bind"]})
    edits.mounts.append({"hostPath": "/run/x", "containerPath": "/run/x", "type": "bind", "options": ["ro"]})
    edits.hooks.append({"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
                        "args": ["nvidia-cdi-hook", "update-ldcache"]})
    edits.additional_gids += [0, 44]
    cfg = config()
    edits.apply(cfg)
    assert cfg["process"]["env"] == ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=void"]
    assert cfg["linux"]["devices"] == [
        {"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255, "fileMode": 0o666},
        {"path": "/dev/nvidia-uvm", "type": "c", "major": 237, "minor": 0, "fileMode": 0o666},
        {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "fileMode": 0o666}]
    assert cfg["linux"]["resources"]["devices"] == [
        {"allow": True, "type": "c", "major": m, "minor": n, "access": "rwm"} for m, n in ((195, 255), (237, 0), (195, 0))]
    assert cfg["mounts"][1:] == [
        {"destination": "/usr/lib/libcuda.so.1", "type": "bind", "source": "/usr/lib/libcuda.so.1",
         "options": ["ro", "nosuid", "nodev", "bind"]},
        {"destination": "/run/x", "type": "bind", "source": "/run/x", "options": ["ro", "bind"]}]
    assert cfg["hooks"] == {"createContainer": [{"path": "/usr/bin/nvidia-cdi-hook",
                                                 "args": ["nvidia-cdi-hook", "update-ldcache"]}]}
    assert cfg["process"]["user"]["additionalGids"] == [44]
    once = json.loads(json.dumps(cfg))
    edits.apply(cfg)
    assert cfg == once, "applying again adds nothing"


def test_apply_takes_the_last_node_of_a_path_and_its_permissions(tmp_path, node):
    _, dev = node
    edits = Edits(device_nodes=[{"path": "/dev/nvidia0", "hostPath": str(dev / "nvidia0")},
                                {"path": "/dev/nvidia0", "hostPath": str(dev / "nvidia1"), "permissions": "rw"},
                                {"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "permissions": "none"}])
    cfg = config()
    edits.apply(cfg)
    assert [(d["path"], d["minor"]) for d in cfg["linux"]["devices"]] == [("/dev/nvidia0", 1), ("/dev/x", 3)]
    assert cfg["linux"]["resources"]["devices"] == [
        {"allow": True, "type": "c", "major": 195, "minor": 1, "access": "rw"}]
    assert edits.node_paths() == ["/dev/nvidia0", "/dev/x"]


def container(tmp_path: Path) -> Path:
    """A stand-in container root whose /dev holds the build machine's nodes."""
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    for name, minor in (("nvidia0", 0), ("nvidia1", 1), ("nvidia7", 7), ("nvidiactl", 255)):
        os.mknod(root / "dev" / name, stat.S_IFCHR | 0o600, os.makedev(195, minor))
    (root / "dev" / "null").touch()
    return root


def test_refresh_nodes_replaces_the_build_machine_s_nodes(tmp_path, node):
    cdi_dir, _ = node
    edits = cdi.load([cdi_dir]).edits([UUIDS[1]])
    edits.device_nodes.append({"path": "/dev/nvidia-caps/nvidia-cap1", "type": "c", "major": 240, "minor": 1,
                               "fileMode": 0o444, "uid": 7, "gid": 8})
    root = container(tmp_path)
    old = os.umask(0o077)  # modes are set, not left to the umask
    try:
        cdi.refresh_nodes(1, edits, ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia7", "/dev/nvidiactl", "/dev/gone"],
                          root=root)
    finally:
        os.umask(old)
    assert sorted(os.listdir(root / "dev")) == ["null", "nvidia-caps", "nvidia-uvm", "nvidia1", "nvidiactl"]
    for name, major, minor, mode in (("nvidia1", 195, 1, 0o666), ("nvidiactl", 195, 255, 0o666),
                                     ("nvidia-uvm", 237, 0, 0o666), ("nvidia-caps/nvidia-cap1", 240, 1, 0o444)):
        st = os.lstat(root / "dev" / name)
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor), name
        assert stat.S_IMODE(st.st_mode) == mode, name
    st = os.lstat(root / "dev" / "nvidia-caps" / "nvidia-cap1")
    assert (st.st_uid, st.st_gid) == (7, 8)
    assert stat.S_IMODE(os.stat(root / "dev" / "nvidia-caps").st_mode) == 0o755


def test_refresh_nodes_does_not_follow_a_dev_symlink(tmp_path, node):
    cdi_dir, _ = node
    root, host = tmp_path / "root", tmp_path / "host"
    host.mkdir()
    root.mkdir()
    (root / "dev").symlink_to(host)
    with pytest.raises(CdiError, match="symlink"):
        cdi.refresh_nodes(1, cdi.load([cdi_dir]).edits(["0"]), [], root=root)
    with pytest.raises(CdiError, match="symlink"):
        cdi.refresh_nodes(1, Edits(), ["/dev/victim"], root=root)
    assert os.listdir(host) == []


def test_refresh_nodes_replaces_a_planted_node_symlink_without_following_it(tmp_path, node):
    cdi_dir, _ = node
    root, host = container(tmp_path), tmp_path / "host"
    host.mkdir()
    (host / "victim").write_text("host file")
    (root / "dev" / "nvidia0").unlink()
    (root / "dev" / "nvidia0").symlink_to(host / "victim")
    (root / "dev" / "nvidia7").unlink()
    (root / "dev" / "nvidia7").symlink_to(host / "victim")
    (root / "dev" / "nvidia-caps").symlink_to(host)
    edits = cdi.load([cdi_dir]).edits(["0"])
    cdi.refresh_nodes(1, edits, ["/dev/nvidia7"], root=root)
    assert stat.S_ISCHR(os.lstat(root / "dev" / "nvidia0").st_mode)
    assert not os.path.lexists(root / "dev" / "nvidia7")
    assert (host / "victim").read_text() == "host file" and os.listdir(host) == ["victim"]
    edits.device_nodes.append({"path": "/dev/nvidia-caps/nvidia-cap1", "type": "c", "major": 240, "minor": 1})
    with pytest.raises(CdiError, match="nvidia-caps.*symlink"):
        cdi.refresh_nodes(1, edits, [], root=root)
    assert os.listdir(host) == ["victim"]


@pytest.mark.parametrize("path", ["/etc/passwd", "/dev/../etc/passwd", "/dev", "/devx/a", "dev/nvidia0"])
def test_refresh_nodes_touches_only_paths_below_dev(tmp_path, path):
    root = container(tmp_path)
    with pytest.raises(CdiError, match="not a plain path below /dev"):
        cdi.refresh_nodes(1, Edits(), [path], root=root)
    with pytest.raises(CdiError, match="not a plain path below /dev"):
        cdi.refresh_nodes(1, Edits(device_nodes=[{"path": path, "type": "c", "major": 1, "minor": 3}]), [], root=root)


def test_a_restored_containers_nodes_are_refreshed_only_below_its_own_root(tmp_path, monkeypatch):
    """container.refresh_gpu_nodes: the container is frozen while root works in its /dev,
    and a process whose root is not the bundle's rootfs (it chrooted, or its checkpoint
    image said so; here: this test's own process, whose root is the host's) is refused
    before anything is made or removed."""
    import os

    from snapbuild.errors import SnapbuildError
    from snapbuild.runtime import container

    calls = []

    class Engine:
        def pause(self, cid):
            calls.append(("pause", cid))

        def resume(self, cid):
            calls.append(("resume", cid))

    monkeypatch.setattr("snapbuild.engines.container_engine", lambda name: Engine())
    (tmp_path / "rootfs").mkdir()
    inst = container.Instance(id="sb-x", engine="runc", bundle=str(tmp_path), netns="", run_dir=str(tmp_path),
                              host_port=None, container_port=None, pid=os.getpid(),
                              gpus=["GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000010"])
    with pytest.raises(SnapbuildError, match="its init's root is not the container's root file system"):
        container.refresh_gpu_nodes(inst, ["/dev/nvidia0"])
    assert calls == [("pause", "sb-x"), ("resume", "sb-x")], "frozen meanwhile, and thawed again"
    inst.pid = 2 ** 22 + 1  # no such process
    with pytest.raises(SnapbuildError, match="its init .* is gone"):
        container.refresh_gpu_nodes(inst, ["/dev/nvidia0"])
