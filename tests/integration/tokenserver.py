"""A small token service for a real docker-registry (CNCF distribution 2.8) configured
with `auth: token`: the Docker/OCI Bearer token flow, as Docker Hub, GHCR, Harbor or
GitLab run it. Their token services are not reachable here, so this stands in for one.

The registry answers 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``;
a client asks this service's realm (``GET /token?service=...&scope=...``, with Basic
credentials) for a token, and this service returns a JWT signed with an ECDSA key whose
self-signed certificate the registry trusts (``rootcertbundle``). The registry checks
issuer, audience, times, the certificate chain (``x5c``) and the granted ``access``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ISSUER = "snapbuild-test-issuer"
SERVICE = "snapbuild-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues tokens to one user; records what it granted in ``grants``."""

    def __init__(self, folder: Path, user: str, password: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.user, self.password = user, password
        self.grants: list[list[str]] = []
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "snapbuild test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = folder / "token-signer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._der = self.cert.public_bytes(serialization.Encoding.DER)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlparse(self.path)
                if url.path != "/token":
                    return self._send(404, {"error": "not found"})
                if self.headers.get("Authorization") != "Basic " + base64.b64encode(
                        f"{server.user}:{server.password}".encode()).decode():
                    return self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                query = parse_qs(url.query)
                scopes = [s for v in query.get("scope", []) for s in v.split(" ") if s]
                server.grants.append(scopes)
                self._send(200, {"token": server.token(query.get("service", [""])[0], scopes),
                                 "expires_in": 300})

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, service: str, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        access = []
        for scope in scopes:  # repository:NAME:pull,push  or  registry:catalog:*
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self._der).decode()]}
        claims = {"iss": ISSUER, "sub": self.user, "aud": service, "iat": now, "nbf": now - 60,
                  "exp": now + 300, "jti": hashlib.sha256(f"{now}{scopes}".encode()).hexdigest()[:16],
                  "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def registry_auth_config(self) -> str:
        """The `auth:` section of the registry's config.yml."""
        return (f"auth: {{token: {{realm: '{self.realm}', service: {SERVICE}, issuer: {ISSUER}, "
                f"rootcertbundle: {self.cert_path}}}}}\n")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
