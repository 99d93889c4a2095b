"""A sentence-embedding server: all-MiniLM-L6-v2 through sentence-transformers (CPU).

The model's files come from a read-only mount (the recipe's `mounts:`), loaded with
HF_HUB_OFFLINE=1: nothing is fetched at start-up, on the build machine or on a node.

GET  /healthz -> 200 once the model is loaded and has encoded once
POST /embed   {"sentences": ["...", ...]}
              -> {"embeddings": [[384 floats], ...], "digest": sha256 of the float32 bytes,
                  "calls": n}
"""

import argparse
import hashlib
import http.server
import json
import os
import socketserver
import time

t0 = time.time()
p = argparse.ArgumentParser()
p.add_argument("--port", type=int, default=8000)
p.add_argument("--model", required=True, help="folder of the sentence-transformers model")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

torch.set_num_threads(args.threads)
t_import = time.time() - t0
model = SentenceTransformer(args.model, device="cpu", local_files_only=True)
model.encode(["A first sentence, to warm the tokenizer and the kernels."])
print(f"imports {t_import:.2f}s, ready in {time.time() - t0:.2f}s "
      f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')})", flush=True)
calls = {"n": 0}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"ok": True, "dim": model.get_embedding_dimension()})

    def do_POST(self):
        if self.path != "/embed":
            return self._send(404, {"error": f"no endpoint {self.path}; POST /embed"})
        try:
            sentences = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))["sentences"]
            if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return self._send(400, {"error": 'expected {"sentences": ["...", ...]}'})
        calls["n"] += 1
        emb = model.encode(sentences, convert_to_numpy=True, normalize_embeddings=True)
        self._send(200, {"embeddings": emb.tolist(), "digest": hashlib.sha256(emb.tobytes()).hexdigest(),
                         "calls": calls["n"]})

    def log_message(self, fmt, *a):
        print("request:", fmt % a, flush=True)


socketserver.TCPServer.allow_reuse_address = True
with socketserver.TCPServer(("127.0.0.1", args.port), Handler) as srv:
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    srv.serve_forever()
