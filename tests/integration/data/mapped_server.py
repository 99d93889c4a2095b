"""A stdlib-only HTTP server that memory-maps a weights file, for mount tests.

GET /healthz -> 200
POST /info   -> {"digest": sha256 of the mapped bytes, "count": n, "read_only": bool,
                 "pid": ...}; read_only tells whether writing beside the file fails with EROFS
"""

import argparse
import errno
import hashlib
import http.server
import json
import mmap
import os
import socketserver

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--weights", required=True)
args = p.parse_args()
with open(args.weights, "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
state = {"count": 0}


def read_only() -> bool:
    try:
        with open(os.path.join(os.path.dirname(args.weights), "probe-write"), "wb"):
            return False
    except OSError as e:
        return e.errno == errno.EROFS


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({"ok": True})

    def do_POST(self):
        state["count"] += 1
        self._send({"digest": hashlib.sha256(mapped[:]).hexdigest(), "count": state["count"],
                    "read_only": read_only(), "pid": os.getpid()})

    def log_message(self, fmt, *a):
        print("request:", fmt % a, flush=True)


socketserver.TCPServer.allow_reuse_address = True
with socketserver.TCPServer(("127.0.0.1", args.port), H) as s:
    print("listening", flush=True)
    s.serve_forever()
