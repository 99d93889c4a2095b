"""The reference MLP (recipes/examples/torch-mlp/model.py) served from an NVIDIA GPU.

The weights are loaded and moved to the GPU, a first pass runs, and the forward pass
for the fixed input is captured as a CUDA graph (--graphs, the default), so that a
warm server has its CUDA context, its weights in GPU memory, its kernels loaded and
its graph captured: what a CUDA checkpoint keeps and a cold start pays for.

GET  /healthz -> 200 when the model is on the GPU and has run once
POST /infer   -> {"digest": sha256 of the output for a fixed input, "calls": n,
                  "device": the GPU's name, "graphs": whether a CUDA graph replays}
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
p.add_argument("--model-dir", required=True, help="the folder holding model.py")
p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True)
args = p.parse_args()
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: this server needs an NVIDIA GPU")
sys.path.insert(0, args.model_dir)
from model import WIDTH, build  # noqa: E402

t_import = time.time() - t0
model = build(device="meta").to_empty(device="cuda")
model.load_state_dict(torch.load(args.weights, map_location="cuda", weights_only=True))
model.eval()
X = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(42)).to("cuda")
with torch.inference_mode():
    out = model(X)  # first pass: context, allocator, kernels
    torch.cuda.synchronize()
graph = None
if args.graphs:
    static_in = X.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):  # warm-up on a side stream, as CUDA graph capture wants
            model(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_out = model(static_in)
    torch.cuda.synchronize()
print(f"import torch {t_import:.2f}s, on {torch.cuda.get_device_name(0)}, graphs={bool(graph)}, "
      f"ready in {time.time() - t0:.2f}s", flush=True)
calls = {"n": 0}


def infer() -> str:
    with torch.inference_mode():
        if graph is not None:
            graph.replay()
            y = static_out
        else:
            y = model(X)
        torch.cuda.synchronize()
        return hashlib.sha256(y.float().cpu().numpy().tobytes()).hexdigest()


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
        self._send({"ok": True, "pid": os.getpid()})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        calls["n"] += 1
        self._send({"digest": infer(), "calls": calls["n"], "device": torch.cuda.get_device_name(0),
                    "graphs": graph is not None})

    def log_message(self, fmt, *a):
        pass


class Server(socketserver.TCPServer):
    allow_reuse_address = True


Server(("127.0.0.1", args.port), Handler).serve_forever()
