"""GPUs for an OCI container from the node's Container Device Interface (CDI) specs.

``nvidia-ctk cdi generate`` writes ``/etc/cdi/nvidia.yaml``: for each GPU, named by
index (``0``), by UUID (``GPU-...``) and ``all``, the device nodes, driver libraries
(mounts), hooks and environment a container needs. :func:`load` reads the node's
specs, :meth:`Registry.edits` collects the requested devices' edits and
:meth:`Edits.apply` writes them into a runc ``config.json``, as CDI-aware runtimes
(containerd, podman) do. A restored container keeps its ``/dev`` (a tmpfs carried in
the checkpoint) with the build machine's nodes: :func:`refresh_nodes` replaces them
with this node's, never through a link the container may have planted.

Hooks of a spec run as root, so a spec file is read only when root (or this user)
owns it and its folder and nobody else may write to either.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SnapbuildError
from ..store.securefs import Beneath, UnsafeDisk, unsafe_relpath

KIND = "nvidia.com/gpu"
DIRS = ("/etc/cdi", "/var/run/cdi")
HOOKS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
EDIT_KEYS = ("env", "deviceNodes", "mounts", "hooks", "additionalGIDs")
GENERATE = "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"
_KIND = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?/[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")
_IFMT = {"b": stat.S_IFBLK, "c": stat.S_IFCHR, "u": stat.S_IFCHR, "p": stat.S_IFIFO}


class CdiError(SnapbuildError):
    """A CDI spec that cannot be used, or a device the node's specs do not have."""

    exit_code = 11


def spec_dirs() -> list[Path]:
    """The node setting ``cdi_dirs`` (``$SNAPBUILD_CDI_DIRS``, ``os.pathsep``-separated), else CDI's defaults."""
    from .. import settings

    return [Path(d) for d in settings.get("cdi_dirs")]


@dataclass
class Edits:
    """What the requested devices add to a container, in CDI's terms."""

    env: list[str] = field(default_factory=list)
    device_nodes: list[dict] = field(default_factory=list)
    mounts: list[dict] = field(default_factory=list)
    hooks: list[dict] = field(default_factory=list)
    additional_gids: list[int] = field(default_factory=list)

    def add(self, edits: dict, where: str = "") -> None:
        """Append a (checked) ``containerEdits``; device nodes get their host numbers."""
        self.env += edits.get("env") or []
        self.device_nodes += [_complete(n, where) for n in edits.get("deviceNodes") or []]
        self.mounts += edits.get("mounts") or []
        self.hooks += edits.get("hooks") or []
        self.additional_gids += edits.get("additionalGIDs") or []

    def nodes(self) -> list[dict]:
        """The device nodes, complete, one per container path (the last one wins)."""
        return list({n["path"]: _complete(n) for n in self.device_nodes}.values())

    def node_paths(self) -> list[str]:
        return list(dict.fromkeys(n["path"] for n in self.device_nodes))

    def apply(self, config: dict) -> None:
        """Write these edits into an OCI runtime ``config`` (config.json) in place;
        applying them again changes nothing more."""
        proc = config.setdefault("process", {})
        env = proc.setdefault("env", [])
        for item in self.env:
            key = item.split("=", 1)[0]
            env[:] = [e for e in env if e.split("=", 1)[0] != key] + [item]
        linux = config.setdefault("linux", {})
        for node in self.nodes():
            dev = {k: node[k] for k in ("path", "type", "major", "minor", "fileMode", "uid", "gid") if k in node}
            devices = linux.setdefault("devices", [])
            devices[:] = [d for d in devices if d.get("path") != dev["path"]] + [dev]
            access = node.get("permissions") or "rwm"
            if dev["type"] != "p" and access != "none":
                rule = {"allow": True, "type": "b" if dev["type"] == "b" else "c", "major": dev["major"],
                        "minor": dev["minor"], "access": access}
                rules = linux.setdefault("resources", {}).setdefault("devices", [])
                if rule not in rules:
                    rules.append(rule)
        for m in self.mounts:
            kind, options = m.get("type") or "bind", list(m.get("options") or [])
            if kind == "bind" and not {"bind", "rbind"} & set(options):
                options.append("bind")  # runc bind-mounts only with one of these options
            mnt = {"destination": m["containerPath"], "type": kind, "source": m["hostPath"], "options": options}
            mounts = config.setdefault("mounts", [])
            mounts[:] = [x for x in mounts if x.get("destination") != mnt["destination"]] + [mnt]
        for h in self.hooks:
            hook = {k: h[k] for k in ("path", "args", "env", "timeout") if h.get(k) is not None}
            have = config.setdefault("hooks", {}).setdefault(h["hookName"], [])
            if hook not in have:
                have.append(hook)
        for gid in self.additional_gids:
            gids = proc.setdefault("user", {"uid": 0, "gid": 0}).setdefault("additionalGids", [])
            if gid and gid not in gids:
                gids.append(gid)


def _complete(node: dict, where: str = "") -> dict:
    """``node`` with its type, major, minor and fileMode, from the host's node when missing."""
    out = dict(node)
    if out.get("type") and (out.get("major") or out["type"] == "p"):
        out.setdefault("fileMode", 0o666)
        return out
    host = out.get("hostPath") or out["path"]
    try:
        st = os.stat(host)
    except OSError as e:
        raise CdiError(f"{where}device node {out['path']}: its host node {host} cannot be read ({e.strerror})",
                       hint=f"is the driver loaded? `{GENERATE}` writes the spec of the GPUs this node has") from None
    kind = next((k for k, f in _IFMT.items() if stat.S_IFMT(st.st_mode) == f), None)
    if kind is None or (out.get("type") and _IFMT[out["type"]] != _IFMT[kind]):
        raise CdiError(f"{where}device node {out['path']}: {host} is not a {out.get('type') or 'device'} node",
                       hint=f"`{GENERATE}` writes the spec of the devices this node has")
    out["type"] = out.get("type") or kind
    out.setdefault("fileMode", stat.S_IMODE(st.st_mode))
    if not out.get("major") and kind != "p":
        out["major"], out["minor"] = os.major(st.st_rdev), os.minor(st.st_rdev)
    return out


@dataclass
class _Spec:
    file: Path
    kind: str
    edits: dict
    devices: dict[str, dict]


class Registry:
    """The devices of the node's CDI specs, by fully-qualified name (``kind=name``)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self._devices: dict[str, tuple[_Spec, dict]] = {}
        self._conflicts: dict[str, tuple[Path, Path]] = {}  # defined twice in one folder

    def devices(self, kind: str = KIND) -> list[str]:
        return [fq.split("=", 1)[1] for fq in self._devices if fq.split("=", 1)[0] == kind]

    def edits(self, names: list[str], kind: str = KIND) -> Edits:
        """The edits of the named devices (``0``, ``GPU-<uuid>``, ``all`` or ``kind=name``),
        each spec's own edits once, before its first device's."""
        out, seen = Edits(), set()
        for name in names:
            fq = name if "=" in name else f"{kind}={name}"
            if fq in self._conflicts:
                a, b = self._conflicts[fq]
                raise CdiError(f"CDI device {fq} is defined both in {a} and in {b}", hint="remove one of the two")
            if fq not in self._devices:
                have = ", ".join(self.devices(fq.split("=", 1)[0])) or "no such device"
                raise CdiError(f"no CDI device {fq} on this node: its specs ({', '.join(map(str, self.dirs))}) "
                               f"have {have}", hint=f"`{GENERATE}` writes the spec of this node's GPUs")
            spec, dev = self._devices[fq]
            if id(spec) not in seen:
                seen.add(id(spec))
                out.add(spec.edits, f"{spec.file}: ")
            out.add(dev, f"{spec.file}: device {fq.split('=', 1)[1]!r}: ")
        return out


def load(dirs: list[Path] | None = None) -> Registry:
    """Read every ``*.yaml``, ``*.yml`` and ``*.json`` spec in ``dirs`` (default
    :func:`spec_dirs`); a later folder's device overrides an earlier one's."""
    reg = Registry(spec_dirs() if dirs is None else [Path(d) for d in dirs])
    for folder in reg.dirs:
        level: dict[str, tuple[_Spec, dict]] = {}
        conflicts: dict[str, tuple[Path, Path]] = {}
        for path in _spec_files(folder):
            spec = _read(path)
            for name, dev in spec.devices.items():
                fq = f"{spec.kind}={name}"
                if fq in level:
                    conflicts[fq] = (level[fq][0].file, path)
                level[fq] = (spec, dev)
        for fq in level:
            reg._conflicts.pop(fq, None)
        reg._conflicts.update(conflicts)
        reg._devices.update(level)
    return reg


def _trusted(st: os.stat_result, path: Path, what: str) -> None:
    why = (f"is owned by uid {st.st_uid}" if st.st_uid not in (0, os.geteuid())
           else f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})" if st.st_mode & 0o022 else "")
    if why:
        raise CdiError(f"CDI {what} {path} {why}: its hooks would run as root, so snapbuild does not read it",
                       hint=f"chown root:root {path} && chmod go-w {path}")


def _spec_files(folder: Path) -> list[Path]:
    try:
        _trusted(os.stat(folder), folder, "spec folder")
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CdiError(f"cannot read the CDI spec folder {folder}: {e.strerror}") from None
    return [folder / n for n in names if n.endswith((".yaml", ".yml", ".json")) and (folder / n).is_file()]


def _read(path: Path) -> _Spec:
    try:
        with open(path, "rb") as f:
            _trusted(os.fstat(f.fileno()), path, "spec")  # the file read is the file checked
            text = f.read()
    except OSError as e:
        raise CdiError(f"cannot read the CDI spec {path}: {e.strerror}") from None
    try:
        doc = json.loads(text)  # JSON is YAML too, and needs no PyYAML (not in the base install)
    except ValueError:
        if path.suffix == ".json":
            raise CdiError(f"CDI spec {path} is not valid JSON", hint=f"write it again: `{GENERATE}`") from None
        try:
            import yaml
        except ImportError:
            raise CdiError(f"CDI spec {path} is YAML, and this install has no YAML parser (PyYAML)",
                           hint="write it as JSON: `nvidia-ctk cdi generate --format=json "
                                "--output=/etc/cdi/nvidia.json` (and remove the YAML one), or `pip install pyyaml`"
                           ) from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CdiError(f"CDI spec {path} is not valid YAML: {e}", hint=f"write it again: `{GENERATE}`") from None
    return _check(doc, path)


def _check(doc: object, path: Path) -> _Spec:
    def bad(what: str) -> CdiError:
        return CdiError(f"CDI spec {path}: {what}", hint=f"fix it, or write it again: `{GENERATE}`")

    if not isinstance(doc, dict):
        raise bad("is not a mapping")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise bad(f"kind {kind!r} is not 'vendor/class' (like nvidia.com/gpu)")
    if not isinstance(doc.get("devices"), list):
        raise bad("has no list of devices")
    spec = _Spec(path, kind, doc.get("containerEdits") or {}, {})
    if problem := _edits_problem(spec.edits):
        raise bad(f"containerEdits: {problem}")
    for i, dev in enumerate(doc["devices"]):
        name = dev.get("name") if isinstance(dev, dict) else None
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad(f"devices[{i}] has no valid name ({name!r})")
        if name in spec.devices:
            raise bad(f"device {name!r} is defined twice")
        edits = dev.get("containerEdits")
        if not isinstance(edits, dict):
            raise bad(f"device {name!r} has no containerEdits")
        if problem := _edits_problem(edits):
            raise bad(f"device {name!r}: containerEdits: {problem}")
        spec.devices[name] = edits
    return spec


def _abs(p: object) -> bool:
    return isinstance(p, str) and p.startswith("/") and "\0" not in p


def _edits_problem(e: object) -> str | None:
    """What is wrong with a ``containerEdits`` (None when nothing is)."""
    if not isinstance(e, dict):
        return "is not a mapping"
    for key, value in e.items():
        if key not in EDIT_KEYS:
            return f"{key} is not an edit snapbuild applies ({', '.join(EDIT_KEYS)})"
        if not isinstance(value, list | None):
            return f"{key} is not a list"
    for v in e.get("env") or []:
        if not isinstance(v, str) or v.find("=") <= 0:
            return f"env {v!r} is not KEY=VALUE"
    for i, n in enumerate(e.get("deviceNodes") or []):
        perm = n.get("permissions") if isinstance(n, dict) else None
        if not isinstance(n, dict) or not _abs(n.get("path")) or not _abs(n.get("hostPath", "/")):
            return f"deviceNodes[{i}] needs an absolute path (and hostPath, if any)"
        if n.get("type") not in (None, "", *_IFMT) or not all(
                type(n.get(k, 0)) is int and n.get(k, 0) >= 0 for k in ("major", "minor", "fileMode", "uid", "gid")):
            return f"deviceNodes[{i}] ({n['path']}): type is not b, c, u or p, or a number is not one"
        if perm not in (None, "", "none") and (not isinstance(perm, str) or perm.strip("rwm")):
            return f"deviceNodes[{i}] ({n['path']}): permissions {perm!r} are not some of r, w, m"
    for i, m in enumerate(e.get("mounts") or []):
        if not isinstance(m, dict) or not _abs(m.get("hostPath")) or not _abs(m.get("containerPath")):
            return f"mounts[{i}] needs an absolute hostPath and containerPath"
        if not isinstance(m.get("options", []), list) or not isinstance(m.get("type", ""), str):
            return f"mounts[{i}] ({m['containerPath']}): options is not a list or type not a string"
    for i, h in enumerate(e.get("hooks") or []):
        if not isinstance(h, dict) or h.get("hookName") not in HOOKS:
            return f"hooks[{i}] has no hookName of {', '.join(HOOKS)}"
        if not _abs(h.get("path")):
            return f"hooks[{i}] ({h['hookName']}): path {h.get('path')!r} is not absolute"
        timeout = h.get("timeout")
        if not isinstance(h.get("args", []), list) or not isinstance(h.get("env", []), list) or (
                timeout is not None and (type(timeout) is not int or timeout <= 0)):
            return f"hooks[{i}] ({h['hookName']}): args or env is not a list, or timeout not a positive number"
    for g in e.get("additionalGIDs") or []:
        if type(g) is not int or g < 0:
            return f"additionalGIDs {g!r} is not a group id"
    return None


def refresh_nodes(pid: int, edits: Edits, stale: list[str], root: Path | None = None) -> None:
    """Make a restored container's ``/dev`` hold this node's device nodes: remove each
    of ``stale`` (the build machine's) that ``edits`` has not, and make each of
    ``edits``' anew. Every folder is opened below ``root`` (default: the container's,
    ``/proc/PID/root``) without following a link, and only paths below ``/dev`` are
    touched: nothing the container planted turns a root mknod or unlink onto the host."""
    nodes = edits.nodes()
    keep = {n["path"] for n in nodes}
    path = "/dev"
    try:
        with Beneath(root if root is not None else Path(f"/proc/{pid}/root")) as below:
            for path in [p for p in stale if p not in keep]:
                fd, name = _parent(below, path, create=False)
                if fd is not None:
                    try:
                        os.unlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        pass
            for node in nodes:
                path = node["path"]
                fd, name = _parent(below, path, create=True)
                assert fd is not None
                _mknod(fd, name, node)
    except (OSError, UnsafeDisk) as e:
        raise CdiError(f"cannot put device node {path} into container {pid}'s /dev: "
                       f"{e.message if isinstance(e, SnapbuildError) else e.strerror or e}",
                       hint="the container's /dev is not as it was at the checkpoint; start it afresh") from None


def _parent(below: Beneath, path: str, create: bool) -> tuple[int | None, str]:
    """(descriptor of the folder of ``path``, its name there); no folder: (None, name)."""
    rel = path[1:]
    if not path.startswith("/dev/") or unsafe_relpath(rel):
        raise CdiError(f"device node {path!r} is not a plain path below /dev: snapbuild makes nodes only there")
    head, _, name = rel.rpartition("/")
    try:
        return below.dir(head), name
    except FileNotFoundError:
        if not create:
            return None, name
    parts = head.split("/")
    below.dir(head, create=True)  # the container's folders below /dev (nvidia-caps), 0755 as udev makes them
    for i in range(2, len(parts) + 1):
        os.fchmod(below.dir("/".join(parts[:i])), 0o755)
    return below.dir(head), name


def _mknod(fd: int, name: str, node: dict) -> None:
    kind, mode = _IFMT[node["type"]], node.get("fileMode", 0o666) & 0o777
    dev = os.makedev(node.get("major", 0), node.get("minor", 0))
    try:
        os.unlink(name, dir_fd=fd)  # a link itself, never what it points at
    except FileNotFoundError:
        pass
    os.mknod(name, kind | mode, dev, dir_fd=fd)
    made = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        st = os.fstat(made)
        if stat.S_IFMT(st.st_mode) != kind or (kind != stat.S_IFIFO and st.st_rdev != dev):
            raise CdiError(f"device node {node['path']} was replaced while snapbuild made it")
        # through the descriptor: the node just checked, whatever the name holds now (umask, races)
        os.chmod(f"/proc/self/fd/{made}", mode)
        os.chown(f"/proc/self/fd/{made}", node.get("uid", 0), node.get("gid", 0))
    finally:
        os.close(made)
