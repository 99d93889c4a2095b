"""A process tree shaped like a real inference server, standard library only.

The parent serves HTTP and owns:
- two *spawned* workers fed through multiprocessing Queues (pipes plus POSIX semaphores,
  kept by name in /dev/shm for the spawned children), reading a
  ``multiprocessing.shared_memory`` ring buffer (a named /dev/shm file) under a Lock;
- a *forked* multiprocessing.Pool of two (its semaphores unlinked at once: deleted
  files in /dev/shm that only the processes hold);
- a shared counter (``multiprocessing.Value``: an mmap of a deleted /dev/shm file);
- a memfd, an eventfd watched by an epoll, and a socketpair.

POST /infer answers the same on every start (what the workers and the pool compute
from the ring); POST /count bumps the warm counter, which a restore keeps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import select
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing import shared_memory

RING = 4096


def square(x: int) -> int:
    return x * x


def worker(index: int, jobs, results, ring_name: str, lock) -> None:
    ring = shared_memory.SharedMemory(name=ring_name)
    try:
        while True:
            job = jobs.get()
            if job is None:
                return
            with lock:
                data = bytes(ring.buf[:RING])
            results.put((index, job, hashlib.sha256(data + job.to_bytes(4, "big")).hexdigest()[:16]))
    finally:
        ring.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()

    spawn = mp.get_context("spawn")
    lock = spawn.Lock()
    ring = shared_memory.SharedMemory(create=True, size=RING)
    ring.buf[:RING] = bytes(i % 251 for i in range(RING))
    jobs, results = spawn.Queue(), spawn.Queue()
    workers = [spawn.Process(target=worker, args=(i, jobs, results, ring.name, lock), daemon=True) for i in range(2)]
    for w in workers:
        w.start()
    pool = mp.get_context("fork").Pool(2)
    counter = spawn.Value("i", 0)
    memfd = os.memfd_create("warm-state")
    os.write(memfd, b"weights:" + bytes(range(256)) * 64)
    efd = os.eventfd(0)
    ep = select.epoll()
    ep.register(efd, select.EPOLLIN)
    left, right = socket.socketpair()
    job_ids = iter(range(1, 1 << 30))

    def infer() -> dict:
        n = next(job_ids)
        for _ in workers:
            jobs.put(n)
        answers = sorted(results.get(timeout=30)[2] for _ in workers)
        os.eventfd_write(efd, 1)
        assert ep.poll(1) and os.eventfd_read(efd) == 1
        left.sendall(b"ping")
        assert right.recv(4) == b"ping"
        os.lseek(memfd, 0, os.SEEK_SET)
        state = hashlib.sha256(os.read(memfd, 1 << 20)).hexdigest()[:16]
        # `n` differs between a warm and a cold server: the answer must not depend on it
        return {"pool": sum(pool.map(square, range(100))), "workers": len(set(answers)) == 1 and answers[0] != "",
                "ring": hashlib.sha256(bytes(ring.buf[:RING])).hexdigest()[:16], "memfd": state}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            print(fmt % a, flush=True)

        def reply(self, obj: dict) -> None:
            body = json.dumps(obj, sort_keys=True).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.reply({"ok": True})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/count":
                with counter.get_lock():
                    counter.value += 1
                    self.reply({"count": counter.value})
            else:
                self.reply(infer())

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on {args.port}; pid {os.getpid()}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
