"""A stand-in for loading a model, shared by the stack examples: a table of bytes made
from a fixed seed (about a second of CPU), and a deterministic answer from it."""

import hashlib

ROWS = 300_000


def load() -> bytes:
    t = hashlib.sha256(b"snapbuild-stack-model").digest()
    out = bytearray()
    for _ in range(ROWS):
        t = hashlib.sha256(t).digest()
        out.append(t[0])
    return bytes(out)


def answer(model: bytes, text: str) -> dict:
    return {"answer": hashlib.sha256(model + text.encode()).hexdigest()[:32], "model_bytes": len(model)}
