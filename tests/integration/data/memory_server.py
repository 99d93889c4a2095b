"""A server whose state is a large block of private anonymous memory: MIB mebibytes,
each filled from its own index, built before it listens. GET /digest hashes all of it,
so a restore that lost or zeroed any page answers otherwise than the warm-up did.
GET /healthz is ready. With --workers K, K children forked after the fill share the
memory copy-on-write (a preloading server's workers) and answer the same on PORT+1..K.
Used for CRIU's lazy pages and huge pages (tests/integration/test_lazy_pages.py), the
size sweep (tests/bench/bench_sizes.py) and tests/bench/bench_thp_fill.py."""

import argparse
import hashlib
import http.server
import os

MIB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mib", type=int, required=True)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    memory = bytearray(args.mib * MIB)
    for i in range(args.mib):
        memory[i * MIB:(i + 1) * MIB] = hashlib.sha256(i.to_bytes(8, "little")).digest() * (MIB // 32)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/digest":
                body = hashlib.sha256(memory).hexdigest().encode()
            elif self.path == "/healthz":
                body = b"ok"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = args.port
    for i in range(args.workers):
        if os.fork() == 0:
            port = args.port + 1 + i
            break
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
