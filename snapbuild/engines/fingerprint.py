"""Compatibility fingerprints: what a checkpoint assumes about the machine.

A checkpoint restores only where the CPU offers every feature the process may have
started using (glibc and torch pick code paths by CPU flags at start-up), the CPU
vendor is the same, and CRIU can read the images. Kernel and CPU model differences
are reported but allowed: CRIU restores across them.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass


def cpu_info() -> dict:
    info = {"vendor": "", "model": "", "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id" and not info["vendor"]:
                    info["vendor"] = value
                elif key == "model name" and not info["model"]:
                    info["model"] = value
                elif key == "flags" and not info["flags"]:
                    info["flags"] = sorted(value.split())
                if info["vendor"] and info["model"] and info["flags"]:
                    break
    except OSError:
        pass
    return info


def host_fingerprint(criu_version: str | None) -> dict:
    cpu = cpu_info()
    return {
        "arch": platform.machine(),
        "cpu_vendor": cpu["vendor"],
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "kernel": platform.release(),
        "criu": criu_version,
        "gpu": None,
    }


@dataclass
class Mismatch:
    field: str
    fatal: bool
    message: str

    def to_json(self) -> dict:
        return {"field": self.field, "fatal": self.fatal, "message": self.message}


def compare(recorded: dict, node: dict) -> list[Mismatch]:
    """Every difference between a snapshot's fingerprint and this node's, explained."""
    out: list[Mismatch] = []
    if recorded.get("arch") != node.get("arch"):
        out.append(Mismatch("arch", True, f"built on {recorded.get('arch')}, this node is {node.get('arch')}"))
    if recorded.get("cpu_vendor") != node.get("cpu_vendor"):
        out.append(Mismatch("cpu_vendor", True,
                            f"CPU vendor {recorded.get('cpu_vendor')!r} at build, {node.get('cpu_vendor')!r} here"))
    missing = sorted(set(recorded.get("cpu_flags") or []) - set(node.get("cpu_flags") or []))
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        out.append(Mismatch("cpu_flags", True, f"this CPU lacks features the checkpoint may use: {shown}"))
    if recorded.get("cpu_model") != node.get("cpu_model"):
        out.append(Mismatch("cpu_model", False,
                            f"CPU model differs ({recorded.get('cpu_model')!r} at build), features suffice"))
    if recorded.get("kernel") != node.get("kernel"):
        out.append(Mismatch("kernel", False, f"kernel {recorded.get('kernel')} at build, {node.get('kernel')} here"))
    rc, nc = recorded.get("criu"), node.get("criu")
    if rc and not nc:
        out.append(Mismatch("criu", True, "criu is not installed on this node"))
    elif rc and nc and _v(nc) < _v(rc)[:2]:
        out.append(Mismatch("criu", True, f"criu {nc} here is older than {rc} used at build"))
    return out  # GPUs are compared by snapbuild.gpu.fingerprint, against the full record


def _v(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", text))
