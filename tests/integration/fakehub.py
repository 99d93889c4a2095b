"""A stand-in for the Hugging Face Hub, which these machines cannot reach.

It speaks the small part of the Hub's HTTP API that the real huggingface_hub client
calls for ``repo_info`` and ``hf_hub_download``: repository info at a revision (with
file sizes and LFS hashes), and ``resolve`` for HEAD and GET of one file at a revision.
Repositories live in memory: ``{repo_id: {revision_or_sha: (commit_sha, {path: bytes})}}``.

Faults, for download tests: a file named in ``stall`` is sent half way, then the
connection hangs (``stalled`` is set) until the test lets go (``release``); one named
in ``cut`` is sent half way and the connection closed, once. GET honours ``Range``
(the client resumes with it), like the Hub's storage.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}
        self.requests: list[str] = []
        self.stall: set[str] = set()
        self.cut: set[str] = set()
        self.stalled = threading.Event()
        self.release = threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, head: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                hub_auth = self.headers.get("Authorization")
                if hub_auth:
                    hub.requests.append("Authorization: (given)")
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and "revision" in parts:
                    i = parts.index("revision")
                    repo, rev = "/".join(parts[2:i]), "/".join(parts[i + 1:])
                    found = hub.lookup(repo, rev)
                    if found is None:
                        return self._not_found(repo, rev, head)
                    sha, files = found
                    siblings = [{"rfilename": p, "size": len(b),
                                 "lfs": {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134}}
                                for p, b in sorted(files.items())]
                    body = json.dumps({"id": repo, "modelId": repo, "sha": sha, "siblings": siblings,
                                       "private": False}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"}, head)
                if "resolve" in parts:
                    i = parts.index("resolve")
                    repo, rev, name = "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:])
                    found = hub.lookup(repo, rev)
                    if found is None or name not in found[1]:
                        return self._not_found(repo, rev, head, entry=name)
                    sha, files = found
                    data = files[name]
                    headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                               "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
                    code, start, end = 200, 0, len(data)
                    rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                    if rng and not head:
                        hub.requests.append(f"Range: {rng.group(0)}")
                        start, end = int(rng.group(1)), int(rng.group(2) or len(data) - 1) + 1
                        code = 206
                        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
                    if not head and start == 0 and name in hub.stall | hub.cut:
                        return self._half(data, headers, name)
                    return self._send(code, data[start:end], headers, head)
                return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)

            def _half(self, data: bytes, headers: dict, name: str):
                """Announce the whole file, send half of it, then hang or hang up."""
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if name in hub.cut:
                    hub.cut.discard(name)
                else:
                    hub.stalled.set()
                    hub.release.wait(60)
                self.close_connection = True
                self.connection.shutdown(2)

            def _not_found(self, repo, rev, head, entry=None):
                known = repo in hub.repos
                code = "EntryNotFound" if known and entry and hub.lookup(repo, rev) else \
                    "RevisionNotFound" if known else "RepoNotFound"
                msg = json.dumps({"error": f"{code}: {repo}@{rev}"}).encode()
                return self._send(404, msg, {"X-Error-Code": code, "X-Error-Message": code,
                                             "Content-Type": "application/json"}, head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, repo: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit on ``branch`` with these files; returns its sha."""
        sha = hashlib.sha1(json.dumps({p: hashlib.sha256(b).hexdigest() for p, b in files.items()},
                                      sort_keys=True).encode() + repo.encode()).hexdigest()
        revs = self.repos.setdefault(repo, {})
        revs[branch] = (sha, dict(files))
        revs[sha] = (sha, dict(files))
        return sha

    def lookup(self, repo: str, rev: str):
        return self.repos.get(repo, {}).get(rev)

    def close(self) -> None:
        self.server.shutdown()
