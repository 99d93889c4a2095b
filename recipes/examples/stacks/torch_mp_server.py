"""torch.multiprocessing workers sharing a tensor with their parent.

The parent makes a weight matrix from a fixed seed and moves it to shared memory
(``share_memory_()``: a /dev/shm file that torch unlinks at once and passes to the
workers as a file descriptor), spawns two workers with it, and serves HTTP. Each
POST /infer writes one weight in place, in the parent, then asks a worker to compute
with the matrix: the answer is right only while parent and workers share its pages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch
import torch.multiprocessing as mp

SIZE = 256


def worker(index: int, weights: torch.Tensor, jobs, results) -> None:
    torch.set_num_threads(1)
    while True:
        job = jobs.get()
        if job is None:
            return
        seed, = job
        x = torch.randn(SIZE, generator=torch.Generator().manual_seed(seed))
        y = torch.tanh(weights @ x)
        results.put(hashlib.sha256(struct.pack(f"{SIZE}f", *y.tolist())).hexdigest()[:32])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    weights = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0)).share_memory_()
    queues = [(ctx.Queue(), ctx.Queue()) for _ in range(2)]
    procs = [ctx.Process(target=worker, args=(i, weights, jobs, results), daemon=True)
             for i, (jobs, results) in enumerate(queues)]
    for p in procs:
        p.start()
    turn = [0]

    class H(BaseHTTPRequestHandler):
        def _send(self, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._send({"ok": True, "workers": [p.pid for p in procs]})

        def do_POST(self) -> None:
            query = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            text = str(query.get("text", "hello"))
            weights[0, 0] = float(len(text))  # in the parent; the worker must see it
            jobs, results = queues[turn[0] % 2]
            turn[0] += 1
            jobs.put((int(hashlib.sha256(text.encode()).hexdigest()[:8], 16),))
            self._send({"answer": results.get(timeout=30), "shared_bytes": weights.numel() * 4})

        def log_message(self, *a) -> None:
            pass

    HTTPServer(("127.0.0.1", args.port), H).serve_forever()


if __name__ == "__main__":
    main()
