"""The shape of vLLM V1's default engine, written with pyzmq: an HTTP API server and an
engine-core process (spawned) talking over ZMQ ipc:// sockets, outputs passed through a
multiprocessing.shared_memory ring buffer.

    client -> HTTP (API server) -> PUSH ipc://.../in -> engine core
    engine core -> writes the answer into the ring -> PUSH ipc://.../out (slot, length)
    API server reads the slot from the ring -> HTTP reply
"""

import argparse
import json
import multiprocessing as mp
import os
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import shared_memory

import zmq

import model

SLOTS, SLOT = 8, 256


def engine_core(ipc: str, ring_name: str) -> None:
    m = model.load()  # the engine core holds the model, as vLLM's does
    ring = shared_memory.SharedMemory(name=ring_name)
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(f"ipc://{ipc}/in")
    push.connect(f"ipc://{ipc}/out")
    while True:
        req = json.loads(pull.recv())
        data = json.dumps(model.answer(m, req["text"]), sort_keys=True).encode()[:SLOT]
        slot = req["id"] % SLOTS
        ring.buf[slot * SLOT:slot * SLOT + len(data)] = data
        push.send(struct.pack("!QI", req["id"], len(data)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ipc", required=True, help="a folder for the ipc:// sockets")
    args = ap.parse_args()
    os.makedirs(args.ipc, exist_ok=True)
    ring = shared_memory.SharedMemory(create=True, size=SLOTS * SLOT)
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(f"ipc://{args.ipc}/in")
    pull.bind(f"ipc://{args.ipc}/out")
    core = mp.get_context("spawn").Process(target=engine_core, args=(args.ipc, ring.name), daemon=True)
    core.start()
    lock, ids = threading.Lock(), iter(range(1 << 62))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            pass

        def do_GET(self):
            self.reply(b'{"ok": true}')

        def do_POST(self):
            text = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}").get("text",
                                                                                                       "hello")
            with lock:  # one request in flight: the ring slot is read before the next is sent
                rid = next(ids)
                push.send(json.dumps({"id": rid, "text": text}).encode())
                got, length = struct.unpack("!QI", pull.recv())
                slot = got % SLOTS
                self.reply(bytes(ring.buf[slot * SLOT:slot * SLOT + length]))

        def reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
