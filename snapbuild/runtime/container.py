"""Servers in OCI containers (engines ``runc`` and ``runsc``), shared by the warm-up on
the build machine and the runner on nodes.

An *instance* is one container: a bundle folder (``config.json`` and ``rootfs/``, an
overlay of the image's layers, each unpacked once per machine), a network namespace
of its own with ``lo`` up (created here and handed to the runtime by path, so the
runtime leaves it out of the checkpoint and a restore joins a fresh one), and a port
forwarder from a host port into that namespace. Inside the container:

    /snapbuild/inputs/<step>   each input tree, read-only ($SNAPBUILD_INPUTS)
    /snapbuild/run             this instance's run folder, with server.log ($SNAPBUILD_RUN)
    /tmp                       a tmpfs (its content is part of a checkpoint)

The root filesystem is read-only. The server's stdout and stderr go to
``/snapbuild/run/server.log``, opened by the server itself (through ``/bin/sh``), so
they are files inside the container that a checkpoint can carry.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import rootfs, tools
from ..errors import SnapbuildError
from ..schema import ServerSpec
from ..store.blobs import BlobStore
from ..store.chunks import ChunkReader
from ..store.tree import load_tree
from . import probe as probes
from . import process
from .identity import ProcessIdentity
from . import erofs, layout, seccomp
from .layout import secure_dir
from .trees import ensure_inputs

INPUTS = "/snapbuild/inputs"
RUN = "/snapbuild/run"
LOG_NAME = "server.log"
IMAGE_JSON = "image.json"
CRIU_CONF = "criu.conf"  # CRIU options for runc (see prepare)


@dataclass
class Instance:
    id: str
    engine: str
    bundle: str
    netns: str
    run_dir: str
    host_port: int | None
    container_port: int | None
    forwarder_pid: int | None = None
    forwarder: dict | None = None  # its identity.ProcessIdentity, so only it is ever stopped
    pid: int | None = None  # the container's init, as this machine sees it
    gpus: list[str] | None = None  # the GPUs (UUIDs) given to it from the node's CDI spec (runc)

    @property
    def log_path(self) -> Path:
        return Path(self.run_dir) / LOG_NAME

    def record_path(self) -> Path:
        return layout.records_dir(Path(self.bundle).parent.parent) / f"{self.id}.json"


# --- the image --------------------------------------------------------------------------

def read_image(blobs: BlobStore, artifact: str) -> tuple[dict, dict]:
    """(image.json, {path: tree entry}) of an image artifact."""
    tree = load_tree(blobs, artifact)
    entries = {e["path"]: e for e in tree["entries"]}
    if IMAGE_JSON not in entries:
        raise SnapbuildError(f"{artifact} is not an image (it has no {IMAGE_JSON})")
    return json.loads(ChunkReader(blobs, entries[IMAGE_JSON]).read()), entries


def layer_dirs(blobs: BlobStore, artifact: str, cache: Path, images: dict[str, str] | None = None) -> list[Path]:
    """The image's layers, each unpacked (once per machine, verified while read) in
    ``cache``, or mounted from its tree image when ``images`` (layer digest -> image
    tree digest) has one (see erofs)."""

    meta, entries = read_image(blobs, artifact)
    secure_dir(cache.parent)
    secure_dir(cache)  # unpacked layers are trusted once complete: nobody else may write here
    out = []
    for layer in meta["layers"]:
        digest = layer["digest"]
        entry = entries[f"layers/{digest.split(':')[1]}.tar"]
        image = (images or {}).get(digest)
        mount_image = None if image is None else (
            lambda dest, image=image: erofs.mount_tree(blobs, image, dest))
        out.append(rootfs.cached_layer(digest, lambda e=entry: ChunkReader(blobs, e), cache,
                                       user=str(blobs.root), mount_image=mount_image))
    return out


# --- the bundle ---------------------------------------------------------------------------

def container_env(spec: ServerSpec) -> dict:
    env = {}
    for item in (spec.image_config or {}).get("Env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("HOME", "/root")
    env.update({"SNAPBUILD_INPUTS": INPUTS, "SNAPBUILD_RUN": RUN, "LANG": env.get("LANG", "C.UTF-8")})
    base = dict(env)
    from .server import _expand, node_env

    for k, v in spec.env.items():
        env[k] = _expand(v, base)
    return {**env, **node_env(spec)}


def config_json(spec: ServerSpec, input_paths: dict[str, Path], run_dir: Path, netns: str) -> dict:
    from .server import _expand

    env = container_env(spec)
    argv = [_expand(a, env) for a in spec.argv]
    cwd = _expand(spec.cwd, env) if spec.cwd else ((spec.image_config or {}).get("WorkingDir") or "/")
    wrapper = f'exec "$@" </dev/null >>{RUN}/{LOG_NAME} 2>&1'
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime",
                                                                                "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        # As big as a host's /dev/shm (tmpfs's own default, half the memory; pages count
        # only once written), not runc's and Docker's 64 MiB: vLLM's engine alone asks
        # 400 MiB of rings there, and PyTorch's workers hit the small one too.
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=50%"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": RUN, "type": "bind", "source": str(run_dir), "options": ["rbind", "rw"]},
    ]
    for name, path in sorted(input_paths.items()):
        mounts.append({"destination": f"{INPUTS}/{name}", "type": "bind", "source": str(path),
                       "options": ["rbind", "ro"]})
    for dest, name in sorted(spec.mounts.items()):
        mounts.append({"destination": dest, "type": "bind", "source": str(input_paths[name]),
                       "options": ["rbind", "ro"]})
    linux = {
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                       {"type": "network", "path": netns}],
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    }
    if spec.io_uring != seccomp.ALLOW:  # io_uring denied as Docker does; runc installs it, CRIU carries it
        linux["seccomp"] = seccomp.oci_profile()
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0},
            "args": ["/bin/sh", "-c", wrapper, "sh", *argv],
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "snapbuild",
        "mounts": mounts,
        "linux": linux,
    }


_NETNS_HINT = "containers need root and iproute2 (`ip`)"


def _netns_create(name: str) -> str:
    for cmd in (["ip", "netns", "add", name], ["ip", "-n", name, "link", "set", "lo", "up"]):
        r = tools.run(cmd, hint=_NETNS_HINT)
        if r.returncode != 0:
            raise SnapbuildError(f"cannot set up the container's network namespace ({' '.join(cmd)}): "
                                 f"{r.stderr.strip()}", hint=_NETNS_HINT)
    return f"/run/netns/{name}"


def _netns_delete(name: str) -> None:
    try:
        tools.run(["ip", "netns", "del", name])
    except SnapbuildError:
        pass  # a namespace left behind holds nothing but a name


def _forward(host_port: int, netns: str, container_port: int, host: str = "127.0.0.1") -> tuple[int, int]:
    """Start a forwarder; returns (its pid, the host port, which may have been 0)."""
    from .portfwd import listen, spawn

    return spawn(listen(host_port, host), netns, container_port)


def _new_instance(spec: ServerSpec, engine: str, host_port: int | None) -> Instance:
    cid = f"sb-{spec.name}-{secrets.token_hex(4)}"[:60]
    bundle = layout.bundle_dir(Path(spec.run_root), cid)
    run_dir = Path(spec.run_dir) / cid
    addr = probes.address(spec.ready)
    return Instance(id=cid, engine=engine, bundle=str(bundle), netns="", run_dir=str(run_dir),
                    host_port=host_port if host_port is not None else (addr[1] if addr else None),
                    container_port=addr[1] if addr else None)


def gpu_edits(gpus: list[str]):
    """The node's CDI edits (snapbuild.runtime.cdi) that give a container these GPUs
    (UUIDs): each by its UUID's device name, else by its index's, as nvidia-ctk names both."""
    from ..gpu.fingerprint import node_gpus
    from . import cdi

    registry = cdi.load()
    names = set(registry.devices())
    order = (node_gpus() or {}).get("uuids") or []
    picked = [u if u in names or u not in order else str(order.index(u)) for u in gpus]
    return registry.edits(picked)


TMPFS_MAGIC = 0x01021994


def _fs_type(fd: int) -> int:
    """The file system type (``statfs.f_type``) of an open descriptor."""
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first field, a long
    if ctypes.CDLL(None, use_errno=True).fstatfs(fd, buf) != 0:
        raise OSError(ctypes.get_errno(), "fstatfs failed")
    return ctypes.c_long.from_buffer(buf).value


def refresh_gpu_nodes(inst: Instance, stale: list[str]) -> None:
    """After a restore: the container's /dev came back as it was at the checkpoint, with
    the build machine's GPU device nodes (``stale``); this node's, for the GPUs it was
    given, take their place (the cgroup allows only those).

    The restored processes came from a snapshot, so they are not trusted to stay put:
    the container is frozen meanwhile; its init must still be the process the pidfd
    names (not a recycled PID) with the bundle's rootfs as its root (a process can
    chroot, and a checkpoint image says where its root is), and its ``/dev`` a tmpfs of
    its own, not a folder of the host bound there."""
    import select

    from ..engines import container_engine
    from . import cdi

    if inst.pid is None or not inst.gpus:
        return
    engine = container_engine(inst.engine)
    try:
        pidfd = os.pidfd_open(inst.pid)
    except OSError as e:
        raise SnapbuildError(f"container {inst.id}: its init (pid {inst.pid}) is gone: {e.strerror}") from None
    try:
        engine.pause(inst.id)
        try:
            root_fd = os.open(f"/proc/{inst.pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                poll = select.poll()
                poll.register(pidfd, select.POLLIN)
                if poll.poll(0):
                    raise SnapbuildError(f"container {inst.id}: its init exited during the restore")
                want = os.stat(Path(inst.bundle) / "rootfs")
                got = os.fstat(root_fd)
                if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
                    raise SnapbuildError(f"container {inst.id}: its init's root is not the container's root "
                                         "file system (the restored process changed it)")
                dev_fd = os.open("dev", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
                try:
                    if _fs_type(dev_fd) != TMPFS_MAGIC:
                        raise SnapbuildError(f"container {inst.id}: its /dev is not the tmpfs a container has")
                finally:
                    os.close(dev_fd)
                cdi.refresh_nodes(inst.pid, gpu_edits(inst.gpus), stale, root=Path(f"/proc/self/fd/{root_fd}"))
            except OSError as e:
                raise SnapbuildError(f"container {inst.id}: cannot look at its /dev: {e.strerror or e}") from None
            finally:
                os.close(root_fd)
        finally:
            engine.resume(inst.id)
    finally:
        os.close(pidfd)


def prepare(spec: ServerSpec, blobs: BlobStore, engine: str, host_port: int | None = None,
            layer_cache: Path | None = None, gpus: list[str] | None = None) -> Instance:
    """Everything but the process: layers, rootfs, inputs, run folder, netns, config.json;
    ``gpus`` (UUIDs, runc only): those GPUs' devices and driver files, from the node's
    CDI spec."""
    inst = _new_instance(spec, engine, host_port)
    inst.gpus = gpus if gpus and engine == "runc" else None
    root = Path(spec.run_root)
    bundle = Path(inst.bundle)
    image = spec.image
    if image is None:
        raise SnapbuildError(f"server {spec.name!r} names no image: it is not a container's")
    try:
        images = spec.tree_images
        layers: list[Path] = []
        inputs = ensure_inputs(blobs, spec.inputs, root, images.trees if images else None, also=lambda: layers.extend(
            layer_dirs(blobs, image, layer_cache or layout.layer_cache(root), images.layers if images else None)))
        Path(inst.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(inst.run_dir) / LOG_NAME).touch()
        bundle.mkdir(parents=True, exist_ok=True)
        rootfs.assemble(layers, bundle / "rootfs", work=bundle / "overlay")
        inst.netns = _netns_create(inst.id)
        config = config_json(spec, inputs, Path(inst.run_dir), inst.netns)
        if inst.gpus:
            gpu_edits(inst.gpus).apply(config)
        # runc hands CRIU the options of the file this annotation names, for checkpoint and
        # restore: deleted files a process holds (multiprocessing's semaphores in the
        # container's /dev/shm) are linked back in, inside the tmpfs the checkpoint carries.
        (bundle / CRIU_CONF).write_text("link-remap\n")
        config["annotations"] = {"org.criu.config": str(bundle / CRIU_CONF)}
        # only root reads it: the process env holds the node's values of env_from_node
        fd = os.open(bundle / "config.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config, indent=1))
        save(inst)
    except BaseException:
        destroy(inst)
        raise
    return inst


def criu_option(inst: Instance, option: str) -> None:
    """One more CRIU option (a config file line: the long option without its dashes)
    for the runc checkpoint or restore of ``inst`` that comes next."""
    with open(Path(inst.bundle) / CRIU_CONF, "a") as f:
        f.write(option + "\n")


def publish(inst: Instance) -> None:
    """Forward the host port into the container's network namespace. Connections made
    before the server listens are closed at once, which probes see as not ready yet."""
    if inst.container_port is None:
        return
    inst.forwarder_pid, inst.host_port = _forward(inst.host_port or 0, inst.netns, inst.container_port)
    fwd = ProcessIdentity.of(inst.forwarder_pid)
    inst.forwarder = fwd.to_json() if fwd else None
    save(inst)


def host_probe(spec: ServerSpec, inst: Instance) -> dict:
    """The recipe's probe, pointed at the instance's host port."""
    return probes.pointed_at(spec.ready, inst.host_port)


def start(spec: ServerSpec, blobs: BlobStore, engine, host_port: int | None = None,
          gpus: list[str] | None = None) -> Instance:
    """A new container from the image, running the server from scratch."""
    inst = prepare(spec, blobs, engine.name, host_port, gpus=gpus)
    return launch(inst, engine, lambda: engine.run(Path(inst.bundle), inst.id, options=spec.engine_options))


def launch(inst: Instance, engine, begin) -> Instance:
    """Publish the port, then ``begin()`` (run or restore) the prepared instance; on any
    failure everything of it is removed again."""
    try:
        publish(inst)  # first: the forwarder's start-up overlaps the container's
        begin()
        inst.pid = init_pid(engine, inst.id)
        save(inst)
    except BaseException:
        destroy(inst)
        raise
    return inst


def checkpoint(inst: Instance, engine, images: Path, work: Path, options: dict | None = None) -> None:
    """Dump the container (it stops); the forwarder goes first, so no connection is open."""
    _stop_forwarder(inst)
    engine.checkpoint(inst.id, images, work, options=options)


def alive(inst: Instance) -> bool:
    return inst.pid is not None and process.alive(inst.pid)


def init_pid(engine, cid: str) -> int:
    st = engine.state(cid)
    if not st or not st.get("pid"):
        raise SnapbuildError(f"container {cid} is not running after start")
    return int(st["pid"])


def _stop_forwarder(inst: Instance) -> None:
    if inst.forwarder_pid:
        recorded = ProcessIdentity.from_json(inst.forwarder)
        if recorded is not None and recorded.pid == inst.forwarder_pid and recorded.alive():
            process.stop(inst.forwarder_pid, timeout=2)
        # else: it is gone, or its PID is another process's now (after a reboot, or a
        # record without an identity): nothing of ours to stop
        process.reap([inst.forwarder_pid])  # one that exited, if it was our child
        inst.forwarder_pid, inst.forwarder = None, None


def destroy(inst: Instance) -> None:
    """Stop and remove everything of the instance: forwarder, container, mounts, netns,
    bundle, record. The run folder (its log) stays."""
    from ..engines import container_engine

    _stop_forwarder(inst)
    try:
        container_engine(inst.engine).delete(inst.id)
    except SnapbuildError:
        pass
    if inst.pid:
        process.reap([inst.pid])  # collect it when it is our child (bench adopts restored ones)
    bundle = Path(inst.bundle)
    rootfs_dir = bundle / "rootfs"
    if os.path.ismount(rootfs_dir):
        try:
            tools.run(["umount", "-l", str(rootfs_dir)])
        except SnapbuildError:
            pass  # removing through a stuck overlay only writes whiteouts into its upper folder
    if inst.netns:
        _netns_delete(inst.id)
    shutil.rmtree(bundle, ignore_errors=True)
    inst.record_path().unlink(missing_ok=True)


def save(inst: Instance) -> None:
    path = inst.record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(inst), indent=1))


def find(run_root: Path, key: str) -> Instance | None:
    """The instance with this container id or init PID, from the records under ``run_root``."""
    d = layout.records_dir(run_root)
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            inst = Instance(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if key in (inst.id, str(inst.pid)):
            return inst
    return None
