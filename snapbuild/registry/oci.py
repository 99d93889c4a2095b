"""``oci://HOST[:PORT]/REPO``: a registry that speaks the OCI distribution API.

Snapshot ``NAME`` lives in repository ``REPO/NAME`` (``NAME`` alone without a REPO).
Blobs are uploaded with POST then PUT (small ones in one request, large ones in
chunks with PATCH), or mounted from another repository of the registry where this
process saw them (a second snapshot name, the remote cache); manifests go up with PUT
by tag or digest; every blob read is checked against its digest. Loopback hosts are spoken to over plain HTTP, others over HTTPS
(``SNAPBUILD_REGISTRY_PLAIN_HTTP=1`` forces HTTP, for a registry on a private network).

Credentials come from where docker and podman keep them, credential helpers
included (:mod:`.credentials`), looked up when the registry first asks. A registry
that asks for Basic auth gets them; one that asks for a Bearer token gets them at
its token service (or anonymously).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import threading
from pathlib import Path
from urllib.parse import urljoin, urlparse

from ..errors import NotFound, RegistryError, UsageError
from ..store.snapshot import MANIFEST_MEDIA_TYPE
from .base import fetch_verified, retrying
from .credentials import credentials
from .ref import Ref

CHUNK = 16 << 20  # blobs above this go up in chunks of this size
# Where blobs were last seen on each registry host (digest -> repository), for this
# process: an upload of a blob another repository has is a cross-repository mount.
_SEEN: dict[str, dict[str, str]] = {}
MANIFEST_ACCEPT = f"{MANIFEST_MEDIA_TYPE}, application/vnd.oci.image.index.v1+json"


class _Transient(Exception):
    """A 5xx answer or a 429: worth another try."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OciRegistry:
    scheme = "oci"

    def __init__(self, host: str, repo: str = "", *, timeout: float = 60, jobs: int = 32) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        self.host, self.prefix = host, repo.strip("/")
        self.url = f"oci://{host}/{self.prefix}".rstrip("/")
        hostname = urlparse(f"//{host}").hostname or host
        plain = _is_loopback(hostname) or os.environ.get("SNAPBUILD_REGISTRY_PLAIN_HTTP") == "1"
        self.base = f"{'http' if plain else 'https'}://{host}"
        self.timeout = timeout
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(jobs, 8))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self._lock = threading.Lock()
        self._found: list[tuple[str, str] | None] = []  # the credentials, once looked up
        self._seen = _SEEN.setdefault(host, {})
        self.mounted = 0  # blobs this object mounted from another repository instead of uploading

    @property
    def _creds(self) -> tuple[str, str] | None:
        if not self._found:
            self._found.append(credentials(urlparse(f"//{self.host}").netloc or self.host))
        return self._found[0]

    # -- HTTP ----------------------------------------------------------------------------
    def _repo(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _request(self, method: str, path: str, *, scope: str, what: str, ok=(200,), body: bool = False, **kw):
        """One call, with auth (answering the registry's challenge once) and retries of
        connection errors and 5xx answers. ``body``: the answer's body is read in one
        piece (``r.content``), inside the retries: a blob of megabytes read that way
        costs a third of what requests' own reading (10 KiB at a time) does."""
        import requests
        import urllib3

        url = path if path.startswith("http") else self.base + path
        base_headers = kw.pop("headers", None) or {}

        def call():
            headers = dict(base_headers)
            auth = self._auth.get(scope)
            if auth:
                headers["Authorization"] = auth
            r = self.session.request(method, url, headers=headers, timeout=self.timeout, **kw)
            if r.status_code == 401 and self._authenticate(r, scope):
                r.close()
                headers["Authorization"] = self._auth[scope]
                r = self.session.request(method, url, headers=headers, timeout=self.timeout, **kw)
            if r.status_code >= 500 or r.status_code == 429:
                raise _Transient(f"{r.status_code} {r.reason}")
            if body and r.status_code == 200:
                try:
                    data = r.raw.read(decode_content=True)
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    raise _Transient(f"the answer broke off: {e}") from None
                finally:
                    r.close()
                r._content, r._content_consumed = data, True  # what r.content returns
            return r

        r = retrying(call, f"{what} at {self.url}", transient=(requests.ConnectionError, requests.Timeout, _Transient))
        if r.status_code in (401, 403):
            raise RegistryError(f"{what} at {self.url}: {'not authorized' if r.status_code == 401 else 'forbidden'}"
                                f" ({r.status_code}{': ' + _error_text(r) if _error_text(r) else ''})",
                                hint="check the credentials: SNAPBUILD_REGISTRY_USERNAME and "
                                     "SNAPBUILD_REGISTRY_PASSWORD, or `skopeo login` / `docker login`")
        if r.status_code not in ok and r.status_code != 404:
            raise RegistryError(f"{what} at {self.url}: {r.status_code} {r.reason} {_error_text(r)}".rstrip())
        return r

    def _authenticate(self, r, scope: str) -> bool:
        """Answer a 401's WWW-Authenticate challenge: Basic with the credentials, or a
        Bearer token from the registry's token service. False when there is no answer."""
        challenge = r.headers.get("WWW-Authenticate", "")
        kind, _, params = challenge.partition(" ")
        if kind.lower() == "basic":
            if not self._creds:
                return False
            token = base64.b64encode(f"{self._creds[0]}:{self._creds[1]}".encode()).decode()
            with self._lock:
                self._auth[scope] = f"Basic {token}"
            return True
        if kind.lower() == "bearer":
            fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
            if "realm" not in fields:
                return False
            # One scope parameter per scope: a mount needs the source's too.
            query = {"service": fields.get("service", ""), "scope": fields.get("scope", scope).split()}
            t = self.session.get(fields["realm"], params=query, auth=self._creds, timeout=self.timeout)
            if t.status_code != 200:
                return False
            body = t.json()
            token = body.get("token") or body.get("access_token")
            if not token:
                return False
            with self._lock:
                self._auth[scope] = f"Bearer {token}"
            return True
        return False

    # -- blobs ---------------------------------------------------------------------------
    def has_blob(self, name: str, digest: str) -> bool:
        r = self._request("HEAD", f"/v2/{self._repo(name)}/blobs/{digest}", scope=self._scope(name, "pull"),
                          what=f"checking blob {digest[:19]}")
        if r.status_code == 200:
            self._seen[digest] = self._repo(name)
        return r.status_code == 200

    def get_blob(self, name: str, digest: str) -> bytes:
        def fetch() -> bytes:
            r = self._request("GET", f"/v2/{self._repo(name)}/blobs/{digest}", scope=self._scope(name, "pull"),
                              what=f"fetching blob {digest[:19]} of {name}", body=True, stream=True)
            if r.status_code == 404:
                raise NotFound(f"blob {digest} of {name} is not in {self.url}",
                               hint="the snapshot is incomplete there: push it again")
            return r.content

        return fetch_verified(fetch, digest, f"{self.url}/{name}")

    def put_blob(self, name: str, digest: str, path: Path) -> bool:
        """Upload the blob; False when it was mounted from another repository instead."""
        repo, scope = self._repo(name), self._scope(name, "pull,push")
        what = f"uploading blob {digest[:19]} to {name}"
        source = self._seen.get(digest)
        # A blob another repository of this registry has is mounted, not sent; when the
        # registry cannot mount it, the same request opens an ordinary upload (202).
        query = f"?mount={digest}&from={source}" if source and source != repo else ""
        r = self._request("POST", f"/v2/{repo}/blobs/uploads/{query}", scope=scope, what=what, ok=(202, 201))
        if r.status_code == 404:
            raise RegistryError(f"{what}: the registry has no upload endpoint for {repo}")
        if r.status_code == 201:
            self.mounted += 1
            self._seen[digest] = repo
            return False
        location = urljoin(self.base + "/", r.headers["Location"])
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size > CHUNK:  # in chunks: PATCH each, then PUT with the digest
                start = 0
                while start < size:
                    data = f.read(CHUNK)
                    end = start + len(data) - 1
                    r = self._request("PATCH", location, scope=scope, what=what, ok=(202,), data=data,
                                      headers={"Content-Type": "application/octet-stream",
                                               "Content-Range": f"{start}-{end}"})
                    location = urljoin(self.base + "/", r.headers["Location"])
                    start = end + 1
                body = b""
            else:
                body = f.read()
        sep = "&" if "?" in location else "?"
        self._request("PUT", f"{location}{sep}digest={digest}", scope=scope, what=what, ok=(201,), data=body,
                      headers={"Content-Type": "application/octet-stream"})
        self._seen[digest] = repo
        return True

    # -- manifests and tags ----------------------------------------------------------------
    def get_manifest(self, name: str, digest: str) -> bytes:
        def fetch() -> bytes:
            r = self._request("GET", f"/v2/{self._repo(name)}/manifests/{digest}", scope=self._scope(name, "pull"),
                              what=f"fetching manifest {digest[:19]} of {name}",
                              headers={"Accept": MANIFEST_ACCEPT})
            if r.status_code == 404:
                raise NotFound(f"manifest {digest} of {name} is not in {self.url}")
            return r.content

        return fetch_verified(fetch, digest, f"{self.url}/{name}")

    def put_manifest(self, name: str, digest: str, data: bytes, tag: str | None) -> None:
        self._request("PUT", f"/v2/{self._repo(name)}/manifests/{tag or digest}", scope=self._scope(name, "pull,push"),
                      what=f"writing manifest of {name}", ok=(201,), data=data,
                      headers={"Content-Type": json.loads(data).get("mediaType", MANIFEST_MEDIA_TYPE)})

    def resolve(self, ref: Ref) -> str:
        target = ref.digest or ref.tag
        r = self._request("HEAD", f"/v2/{self._repo(ref.name)}/manifests/{target}",
                          scope=self._scope(ref.name, "pull"), what=f"resolving {ref}",
                          headers={"Accept": MANIFEST_ACCEPT})
        if r.status_code == 404:
            tags = ", ".join(t for t, _ in self.tagged(ref.name)) if not ref.digest else ""
            raise NotFound(f"{ref} is not in {self.url}" + (f" (tags: {tags or 'none'})" if not ref.digest else ""),
                           hint=f"list what is there with: snapbuild ls --registry {self.url}")
        digest = r.headers.get("Docker-Content-Digest")
        if ref.digest:
            return ref.digest
        if not digest:
            from .base import sha256_of

            digest = sha256_of(self._request("GET", f"/v2/{self._repo(ref.name)}/manifests/{target}",
                                             scope=self._scope(ref.name, "pull"), what=f"resolving {ref}",
                                             headers={"Accept": MANIFEST_ACCEPT}).content)
        return digest

    def referrers(self, name: str, digest: str) -> list[dict] | None:
        """Descriptors of the manifests whose ``subject`` is ``digest``, from the OCI 1.1
        referrers API; None when the registry does not offer it (it answers 404, as
        distribution 2.8 does: the spec forbids a 404 from a registry that has the API)."""
        r = self._request("GET", f"/v2/{self._repo(name)}/referrers/{digest}", scope=self._scope(name, "pull"),
                          what=f"listing referrers of {digest[:19]} in {name}",
                          headers={"Accept": "application/vnd.oci.image.index.v1+json"})
        if r.status_code == 404:
            return None
        try:
            return list(r.json().get("manifests") or [])
        except ValueError:
            raise RegistryError(f"the referrers of {digest[:19]} in {self.url}/{name} are not an image index") from None

    def names(self) -> list[str]:
        out, path = [], "/v2/_catalog?n=1000"
        while path:
            r = self._request("GET", path, scope="registry:catalog:*", what="listing repositories")
            if r.status_code == 404:
                break
            out += r.json().get("repositories") or []
            link = re.search(r"<([^>]+)>", r.headers.get("Link", ""))
            path = link.group(1) if link else None
        pre = f"{self.prefix}/" if self.prefix else ""
        return sorted(n[len(pre):] for n in out if n.startswith(pre))

    def tagged(self, name: str) -> list[tuple[str, str]]:
        r = self._request("GET", f"/v2/{self._repo(name)}/tags/list", scope=self._scope(name, "pull"),
                          what=f"listing tags of {name}")
        if r.status_code == 404:
            return []
        tags = sorted(r.json().get("tags") or [])
        return [(t, self.resolve(Ref(name=name, tag=t))) for t in tags]

    def delete(self, ref: Ref) -> None:
        """The OCI API deletes manifests by digest: every tag pointing at it goes too."""
        digest = self.resolve(ref)
        r = self._request("DELETE", f"/v2/{self._repo(ref.name)}/manifests/{digest}",
                          scope=self._scope(ref.name, "pull,push,delete"), what=f"deleting {ref}", ok=(202, 200))
        if r.status_code == 404:
            raise NotFound(f"{ref} is not in {self.url}")

    def _scope(self, name: str, actions: str) -> str:
        return f"repository:{self._repo(name)}:{actions}"


def _error_text(r) -> str:
    try:
        errors = r.json().get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    except ValueError:
        return ""


def parse_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if not parsed.netloc:
        raise UsageError(f"registry URL {url!r}: expected oci://HOST[:PORT]/REPO")
    return parsed.netloc, parsed.path.strip("/")
