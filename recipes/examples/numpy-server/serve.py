"""A small HTTP server with numpy state: the reference workload for host snapshots.

GET  /healthz  -> 200 once the model is built
POST /infer    -> {"digest": sha256 of W @ x for a fixed x, "calls": n}
The weights come from a fixed seed, so every cold start answers the same digest;
`calls` counts requests, so a restored server shows the state it was dumped with.
"""

import argparse
import hashlib
import http.server
import json
import socketserver
import sys
import time

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, default=8000)
p.add_argument("--size", type=int, default=512)
args = p.parse_args()

t0 = time.time()
rng = np.random.default_rng(1234)
W = rng.standard_normal((args.size, args.size)).astype(np.float32)
X = np.linspace(-1, 1, args.size, dtype=np.float32)
state = {"calls": 0}
print(f"model ready in {time.time() - t0:.2f}s", flush=True)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no socket left open

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/healthz":
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/infer":
            return self._send(404, {"error": "not found"})
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        state["calls"] += 1
        y = np.tanh(W @ X)
        self._send(200, {"digest": hashlib.sha256(y.tobytes()).hexdigest(), "calls": state["calls"]})

    def log_message(self, fmt, *a):
        print("request:", fmt % a, flush=True)


class Server(socketserver.TCPServer):
    allow_reuse_address = True


with Server(("127.0.0.1", args.port), Handler) as srv:
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    sys.stdout.flush()
    srv.serve_forever()
