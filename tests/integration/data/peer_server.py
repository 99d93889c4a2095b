"""An HTTP server that, before it gets ready, connects to a unix socket that a process
outside its tree listens on (as a log shipper or a sidecar would)."""

import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
peer.connect(sys.argv[2])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
