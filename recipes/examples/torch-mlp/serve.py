"""An inference server for the reference MLP (torch CPU).

--load copy (the usual way): torch.load the state dict into a model with real
parameters. The weights are then anonymous memory, and a CRIU checkpoint of the warm
server carries all of them.

--load mmap: the weights are memory-mapped from their read-only file (torch.load(mmap=True)
into a meta-device model, then load_state_dict(assign=True)): their pages stay
file-backed, so a CRIU checkpoint leaves them out and stays small.

GET  /healthz -> 200 when the model is loaded and has run once
POST /infer   -> {"digest": sha256 of the output for a fixed input, "calls": n}
"""

import argparse
import hashlib
import http.server
import json
import os
import socketserver
import sys
import time

t0 = time.time()
import torch  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, default=8000)
p.add_argument("--weights", required=True)
p.add_argument("--load", choices=["copy", "mmap"], default="copy")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import WIDTH, build  # noqa: E402

torch.set_num_threads(args.threads)
t_import = time.time() - t0
if args.load == "mmap":
    with torch.device("meta"):
        model = build(device="meta")
    model.load_state_dict(torch.load(args.weights, mmap=True, weights_only=True), assign=True)
else:
    model = build(device="meta").to_empty(device="cpu")  # no random init: the weights overwrite it
    model.load_state_dict(torch.load(args.weights, weights_only=True))
model.eval()
gen = torch.Generator().manual_seed(42)
X = torch.randn(8, WIDTH, generator=gen)
with torch.inference_mode():
    model(X)  # first pass: allocator, kernels
print(f"import torch {t_import:.2f}s, weights loaded ({args.load}) and ready in {time.time() - t0:.2f}s",
      flush=True)
calls = {"n": 0}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"ok": True})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        calls["n"] += 1
        with torch.inference_mode():
            y = model(X)
        self._send({"digest": hashlib.sha256(y.numpy().tobytes()).hexdigest(), "calls": calls["n"]})

    def log_message(self, fmt, *a):
        print("request:", fmt % a, flush=True)


socketserver.TCPServer.allow_reuse_address = True
with socketserver.TCPServer(("127.0.0.1", args.port), Handler) as srv:
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    srv.serve_forever()
