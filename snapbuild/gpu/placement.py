"""Which GPUs of a node a server goes to, and how a CUDA checkpoint gets there.

A CUDA checkpoint remembers the GPUs it was taken on by UUID (``gpu.uuids``: those its
processes used, as ``nvidia-smi --query-compute-apps`` saw them). A restore puts that
state back on *target* GPUs of this node:

- ``--gpu INDEX|UUID[,...]`` names them (one per recorded GPU, in its order);
- else the recorded UUIDs themselves when this node has them all (the machine that
  built it), else the node's first GPUs by index.

Targets other than the recorded UUIDs need the driver to move GPU state between
devices: cuda-checkpoint's ``--device-map OLD=NEW,...`` or the driver API's GPU pairs
(``CUcheckpointRestoreArgs.gpuPairs``), NVIDIA driver r580 and later. An older driver
restores only onto the very GPUs of the checkpoint, so elsewhere the runner boots cold,
with that reason. A cold boot sees only its targets (``CUDA_VISIBLE_DEVICES``, or the
container's devices).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import UsageError

#: The first NVIDIA driver branch whose checkpoints restore onto other GPUs.
MIGRATING_DRIVER = 580


@dataclass(frozen=True)
class Placement:
    targets: list[str]  # this node's GPU UUIDs, one per recorded GPU, in its order
    device_map: dict[str, str] = field(default_factory=dict)  # recorded UUID -> target, when any differs

    def to_json(self) -> dict:
        return {"gpus": list(self.targets), "device_map": dict(self.device_map)}


def parse(text: str | list[str] | None) -> list[str] | None:
    """``--gpu`` values (``0``, ``GPU-...``, ``0,1``, or repeated) as one list."""
    if text is None:
        return None
    items = [text] if isinstance(text, str) else list(text)
    out = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    return out or None


def resolve(wanted: list[str], node: dict | None) -> list[str]:
    """GPU indexes or UUIDs, as this node's UUIDs; a GPU the node lacks, or one named
    twice, is a usage error that lists the node's GPUs."""
    uuids = list((node or {}).get("uuids") or [])
    have = ", ".join(f"{i}: {u}" for i, u in enumerate(uuids)) or "none"
    out = []
    for item in wanted:
        if item.isdigit() and int(item) < len(uuids):
            uuid = uuids[int(item)]
        elif item in uuids:
            uuid = item
        else:
            raise UsageError(f"--gpu {item}: this node has no such GPU (its GPUs: {have})",
                             hint="name a GPU by its index or its UUID, as `nvidia-smi -L` lists them")
        if uuid in out:
            raise UsageError(f"--gpu names GPU {uuid} twice", hint="one GPU per GPU of the snapshot")
        out.append(uuid)
    return out


def recorded_uuids(gpu: dict) -> list[str]:
    """The GPUs a checkpoint's state is on: those its processes used, else (snapshots
    from before that was recorded) every GPU of the build machine."""
    fp = gpu.get("fingerprint") or {}
    return list(gpu.get("uuids") or (fp.get("uuids") or [])[:fp.get("count") or None])


def driver_branch(version: str | None) -> int:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else 0


def place(gpu: dict, node: dict | None, wanted: list[str] | None) -> tuple[Placement | None, str | None]:
    """Where the checkpoint ``gpu`` (checkpoint.json's ``gpu``) restores on ``node``
    (``fingerprint.node_gpus()``): (placement, None), or (None, why it cannot)."""
    old = recorded_uuids(gpu)
    uuids = list((node or {}).get("uuids") or [])
    if not old:
        return None, "the snapshot does not say which GPUs its state was taken on"
    if wanted is not None:
        targets = resolve(wanted, node)
        if len(targets) != len(old):
            raise UsageError(f"--gpu names {len(targets)} GPU(s); the snapshot's GPU state is on {len(old)}",
                             hint=f"give {len(old)} GPU(s), e.g. --gpu {','.join(map(str, range(len(old))))}")
    elif all(u in uuids for u in old):
        targets = old
    else:
        targets = uuids[:len(old)]
    if len(targets) < len(old):
        return None, f"the snapshot's GPU state is on {len(old)} GPU(s), this node has {len(uuids)}"
    if targets == old:
        return Placement(targets), None
    driver = (node or {}).get("driver")
    if driver_branch(driver) < MIGRATING_DRIVER:
        return None, (f"the GPU state was taken on {', '.join(old)} and would go to {', '.join(targets)}: NVIDIA "
                      f"driver {driver} cannot move CUDA state to other GPUs (driver r{MIGRATING_DRIVER} and later "
                      "can), so it restores only onto the GPUs it was taken on")
    return Placement(targets, dict(zip(old, targets, strict=True))), None


def cold_targets(gpu: dict | None, node: dict | None, wanted: list[str] | None) -> list[str] | None:
    """The GPUs a cold boot gets: those named, else as many as the snapshot used, from
    the placement rule above; None: no GPU assignment (the server sees what it sees)."""
    if wanted is not None:
        return resolve(wanted, node)
    if not gpu or not node:
        return None
    old = recorded_uuids(gpu)
    uuids = list(node.get("uuids") or [])
    return old if all(u in uuids for u in old) else uuids[:len(old)] or None


def uuid_bytes(uuid: str) -> bytes:
    """``GPU-1d5f4c2e-...`` as the driver's 16-byte CUuuid."""
    hexits = re.sub(r"^(GPU|MIG)-", "", uuid).replace("-", "")
    if not re.fullmatch(r"[0-9a-fA-F]{32}", hexits):
        raise ValueError(f"not a GPU UUID: {uuid!r}")
    return bytes.fromhex(hexits)
