"""A server whose tree changes after it is ready, standard library only.

--lazy: the first POST /infer forks a helper (it answers through a pipe), so the tree
  grows after the readiness probe, during the warm-up's exercises.
--zombie: forks a child that exits at once with status 7 and is not reaped until
  GET /reap asks (a child that exited before or while the checkpoint was taken).
--escape: after binding its port, double-forks a daemon into a session of its own
  that keeps the listening socket (what `daemon(3)` does): a process outside the
  server's tree and session holding its socket.
--map PATH: memory-maps that file before any fork, so every process of the tree maps
  it (with the GPU stand-ins, a fake libcuda.so.1 makes each a "CUDA process").
--churn: a thread forks a short-lived child every few milliseconds, each exiting at
  once and reaped by the parent (a supervisor recycling workers, a shell-out per
  request): children come and go while the checkpoint is taken.

POST /infer -> {"helper": <what the helper computed>, "pid": ..., "children_seen": n}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--lazy", action="store_true")
ap.add_argument("--churn", action="store_true")
ap.add_argument("--zombie", action="store_true")
ap.add_argument("--escape", action="store_true")
ap.add_argument("--map")
args = ap.parse_args()
state = {"helper": None, "churned": 0, "zombie": None}
lock = threading.Lock()


def helper(rd: int, wr: int) -> None:
    while True:
        data = os.read(rd, 64)
        if not data:
            os._exit(0)
        os.write(wr, hashlib.sha256(data).hexdigest()[:16].encode())


def start_helper() -> tuple[int, int]:
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    if os.fork() == 0:
        helper(to_child, from_child)
    return from_parent, to_parent


def ask_helper(text: bytes) -> str:
    with lock:
        if state["helper"] is None:
            state["helper"] = start_helper()
        wr, rd = state["helper"]
        os.write(wr, text)
        return os.read(rd, 64).decode()


def churn() -> None:
    while True:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        state["churned"] += 1
        time.sleep(0.002)


class H(BaseHTTPRequestHandler):
    def _send(self, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/reap" and state["zombie"]:
            pid, status = os.waitpid(state["zombie"], os.WNOHANG)
            self._send({"reaped": pid == state["zombie"], "status": os.waitstatus_to_exitcode(status) if pid else None})
            return
        if self.path == "/churned":
            self._send({"churned": state["churned"]})
            return
        self._send({"ok": True})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send({"helper": ask_helper(b"question"), "pid": os.getpid()})

    def log_message(self, *a) -> None:
        pass


if args.map:
    import mmap

    with open(args.map, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
server = ThreadingHTTPServer(("127.0.0.1", args.port), H)
if args.escape and os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(3600)  # holds every inherited descriptor, the listening socket too
    os._exit(0)
if args.zombie:
    state["zombie"] = os.fork()
    if state["zombie"] == 0:
        os._exit(7)
if not args.lazy:
    state["helper"] = start_helper()
if args.churn:
    threading.Thread(target=churn, daemon=True).start()
server.serve_forever()
