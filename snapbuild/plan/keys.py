"""Cache keys: sha256 of the canonical JSON of everything a step's output depends on.

    material = {"kind": ..., "version": ..., "layout": N, "spec": {...}, "pins": {...},
                "inputs": {dep: key}}
    key      = sha256(canonical_json(material))

``spec`` is the templated spec minus keyless fields (``needs``, ``description``, ...),
``pins`` the immutable ids of outside data the kind resolved (file digests, image
digests), ``inputs`` the keys of the steps it reads. No times, no absolute paths of the
cache, no secret values: two machines building the same recipe agree on every key.
``layout`` is the version of how artifacts are stored (chunks, packs): a change there
rebuilds every step once, so that a store does not keep old-layout artifacts forever.
"""

from __future__ import annotations

import hashlib

from ..store.fsutil import canonical_json

SHORT = 12
# 2: files under 1 MiB packed together (store/chunks.py)
LAYOUT = 2


def key_material(kind, spec, pins: dict, input_keys: dict[str, str]) -> dict:
    return {
        "kind": kind.name,
        "version": kind.version,
        "layout": LAYOUT,
        "spec": spec.key_fields(),
        "pins": pins,
        "inputs": dict(sorted(input_keys.items())),
    }


def key_of(material: dict) -> str:
    return hashlib.sha256(canonical_json(material)).hexdigest()


def short(key: str | None) -> str:
    return key[:SHORT] if key else "-"


def why_changed(old: dict | None, new: dict) -> str:
    """The first difference between a step's last recorded build and now, in words."""
    if not old:
        return "never built"
    if old.get("kind") != new["kind"]:
        return f"kind changed ({old.get('kind')} -> {new['kind']})"
    if old.get("layout", 1) != new.get("layout", 1):
        return f"storage layout changed (v{old.get('layout', 1)} -> v{new.get('layout', 1)})"
    if old.get("version") != new["version"]:
        return f"{new['kind']} step format changed (v{old.get('version')} -> v{new['version']})"
    o_spec, n_spec = old.get("spec", {}), new["spec"]
    for k in list(n_spec) + [k for k in o_spec if k not in n_spec]:
        if o_spec.get(k) != n_spec.get(k):
            return f"spec.{k} changed"
    o_pins, n_pins = old.get("pins", {}), new["pins"]
    for k in list(n_pins) + [k for k in o_pins if k not in n_pins]:
        if o_pins.get(k) != n_pins.get(k):
            return _pin_change(k, o_pins.get(k), n_pins.get(k))
    o_in, n_in = old.get("inputs", {}), new["inputs"]
    for k in sorted(set(o_in) | set(n_in)):
        if k not in o_in:
            return f"new input {k}"
        if k not in n_in:
            return f"input {k} removed"
        if o_in[k] != n_in[k]:
            return f"input {k} changed"
    return "not in the cache (removed by gc or verify --repair, or never stored)"


def _pin_change(name: str, old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        added = [k for k in changed if k not in old]
        removed = [k for k in changed if k not in new]
        modified = [k for k in changed if k in old and k in new]
        parts = []
        for label, items in (("changed", modified), ("added", added), ("removed", removed)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        return f"{name} " + "; ".join(parts)
    return f"{name} changed"
