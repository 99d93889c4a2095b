"""A stdlib-only HTTP server with state, for checkpoint tests.

GET /healthz -> 200;  POST /count -> {"pid": ..., "count": n}  (n counts requests)
--connect-unix PATH keeps a connection to an outside unix socket (CRIU cannot dump that).
--weights PATH memory-maps that file; POST then also answers "digest" (sha256 of the
mapped bytes) and "read_only" (whether writing beside the file fails with EROFS).
--answer-file PATH: GET /answer -> that file's bytes, read at each request (a check
request whose answer a test can change between the warm-up and a restore).
"""

import argparse
import errno
import hashlib
import http.server
import json
import mmap
import os
import socket
import socketserver

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--connect-unix")
p.add_argument("--weights")
p.add_argument("--answer-file")
args = p.parse_args()
if args.connect_unix:
    keep = socket.socket(socket.AF_UNIX)
    keep.connect(args.connect_unix)
if args.weights:
    with open(args.weights, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
state = {"count": 0}


def weights_info() -> dict:
    try:
        with open(os.path.join(os.path.dirname(args.weights), "probe-write"), "wb"):
            read_only = False
    except OSError as e:
        read_only = e.errno == errno.EROFS
    return {"digest": hashlib.sha256(mapped[:]).hexdigest(), "read_only": read_only}


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/answer" and args.answer_file:
            with open(args.answer_file, "rb") as f:
                body = f.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._send({"ok": True})

    def do_POST(self):
        state["count"] += 1
        self._send({"pid": os.getpid(), "count": state["count"], **(weights_info() if args.weights else {})})

    def log_message(self, fmt, *a):
        print("request:", fmt % a, flush=True)


socketserver.TCPServer.allow_reuse_address = True
with socketserver.TCPServer(("127.0.0.1", args.port), H) as s:
    print("listening", flush=True)
    s.serve_forever()
