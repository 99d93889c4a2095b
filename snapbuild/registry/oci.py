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

Reads honour containerd's registry host configuration (:mod:`.hosts`): blobs and
manifests by digest come from the mirrors that may ``pull``, tags from those that may
``resolve``, in the file's order, then from the origin. A mirror is asked with
``?ns=HOST`` (the registry it stands in for), has its own auth, and is skipped, with a
warning, when it fails in any way (it is never trusted: what it serves is verified by
digest like anything else); one that cannot be connected to is skipped for the rest
of the object's life. Only the origin's failure is an error. Writes, deletes and
listings go to the origin alone.

Every answer is read bounded (:mod:`.bounds`): a blob by its descriptor's size, any
other body by ``DOCUMENT_MAX``; each try within a deadline over the whole answer
(its connection is cut when it passes); ``Accept-Encoding: identity``, and an
answer with a ``Content-Encoding`` is refused.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlparse

from ..errors import NotFound, RegistryError, SnapbuildError, UsageError
from .. import settings
from ..store.snapshot import MANIFEST_MEDIA_TYPE
from . import hosts as hosts_config
from .base import retrying
from .bounds import DOCUMENT_MAX, Deadline, Short, Sink, Sizes, deadline_for, read_verified, watch
from .credentials import credentials
from .ref import Ref

log = logging.getLogger(__name__)
T = TypeVar("T")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

CHUNK = 16 << 20  # blobs above this go up in chunks of this size
# Where blobs were last seen on each registry host (digest -> repository), for this
# process: an upload of a blob another repository has is a cross-repository mount.
_SEEN: dict[str, dict[str, str]] = {}
MANIFEST_ACCEPT = f"{MANIFEST_MEDIA_TYPE}, application/vnd.oci.image.index.v1+json"


class _Transient(Exception):
    """A 5xx answer or a 429: worth another try."""


class _Unreachable(Exception):
    """A mirror that cannot be connected to (refused, no route, TLS, timed out)."""


class _Endpoint:
    """One host that answers for the registry, a mirror or the origin, with its own
    auth state (a mirror may ask for credentials of its own, looked up for its host)."""

    def __init__(self, host: hosts_config.Host, creds_host: str, ns: str | None) -> None:
        self.host = host
        self.root = host.url  # the API root: request paths are appended to it
        self.creds_host = creds_host
        self.ns = ns  # the registry a mirror stands in for (None: this is the origin)
        self.auth: dict[str, str] = {}  # scope -> Authorization header value
        self.found: list[tuple[str, str] | None] = []  # the credentials, once looked up
        self.headers = dict(host.header)
        self.tls = host.tls()
        self.down = False  # a mirror that could not be connected to: not asked again

    @property
    def creds(self) -> tuple[str, str] | None:
        if not self.found:
            # the environment's pair is the origin's: a mirror (a peer node, a cache) never gets it
            self.found.append(credentials(self.creds_host, env=self.ns is None))
        return self.found[0]

    def url(self, path: str) -> str:
        if path.startswith("http"):
            return path
        url = self.root + path
        if self.ns is not None:
            url += ("&" if "?" in url else "?") + "ns=" + quote(self.ns, safe=":[]")
        return url


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
        plain = _is_loopback(hostname) or bool(settings.get("registry_plain_http"))
        self.hosts = hosts_config.load(host, plain=plain)
        creds_host = urlparse(f"//{host}").netloc or host
        self._origin = _Endpoint(self.hosts.origin, creds_host, None)
        self._mirrors = [_Endpoint(m, m.netloc, host) for m in self.hosts.mirrors]
        self.base = self.hosts.origin.base
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Accept-Encoding"] = "identity"  # bytes are hashed as they come, never decoded
        self.session.hooks["response"].append(_bounded_redirect)
        adapter = HTTPAdapter(pool_connections=4 + len(self._mirrors), pool_maxsize=max(jobs, 8))
        adapter.poolmanager.pool_classes_by_scheme = _watched_pools()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._lock = threading.Lock()
        self._seen = _SEEN.setdefault(host, {})
        self.mounted = 0  # blobs this object mounted from another repository instead of uploading
        self.sizes = Sizes()

    def at_origin(self) -> OciRegistry:
        """This registry without its mirrors: for a read that a write then builds on
        (signing reads the tag and the referrers index it extends), where a stale
        mirror would make it sign or extend the wrong thing."""
        import copy

        out = copy.copy(self)
        out._mirrors = []
        return out

    # -- HTTP ----------------------------------------------------------------------------
    def _repo(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _request(self, method: str, path: str, *, scope: str, what: str, ok=(200,), read=None, size: int = 0,
                 at: _Endpoint | None = None, **kw):
        """One call to ``at`` (the origin by default), with auth (answering the host's
        challenge once) and, at the origin, retries of connection errors, broken answers
        and 5xx answers (a mirror gets one try: the next host is its retry). ``path`` is
        below the API root (``/REPO/blobs/DIGEST``), or a whole URL. ``read(r)`` reads a
        200 answer's body (a blob, into its sink: see bounds.Sink.take) inside the
        retries; any other body is read whole, at most DOCUMENT_MAX (``r.content``).
        Each try has a deadline over its whole answer, for ``size`` bytes (a blob's) or
        a document, plus what it sends (bounds.deadline_for)."""
        import requests

        ep = at or self._origin
        url = ep.url(path)
        base_headers = {**ep.headers, **(kw.pop("headers", None) or {})}
        kw.update(ep.tls)
        seconds = deadline_for(max(size, DOCUMENT_MAX) + len(kw.get("data") or b""))
        read_timeout = min(self.timeout, seconds)
        timeout = read_timeout if ep.host.dial_timeout is None else (ep.host.dial_timeout, read_timeout)
        where = self._where(ep)

        def attempt():
            headers = dict(base_headers)
            auth = ep.auth.get(scope)
            if auth:
                headers["Authorization"] = auth
            r = self.session.request(method, url, headers=headers, timeout=timeout, stream=True, **kw)
            answer = self._authenticate(ep, r, scope) if r.status_code == 401 else None
            if answer:
                # This request's own answer, not ep.auth[scope] read again: another thread may
                # have put a token for a narrower scope there meanwhile (a cross-repository
                # mount's challenge names the source repository too; a plain upload's does not).
                r.close()
                headers["Authorization"] = answer
                r = self.session.request(method, url, headers=headers, timeout=timeout, stream=True, **kw)
            try:
                if r.status_code >= 500 or r.status_code == 429:
                    raise _Transient(f"{r.status_code} {r.reason}")
                if read is not None and r.status_code == 200:
                    read(r)
                else:  # a HEAD's Content-Length is the blob's, and it has no body
                    r._content = _document(r, f"{what} at {where}") if method != "HEAD" else b""
                    r._content_consumed = True  # what r.content returns
            finally:
                r.close()
            return r

        def call():
            with Deadline(seconds) as dl:
                try:
                    r = attempt()
                    if dl.cut_off:  # headers that "ended" when the deadline cut them
                        raise dl.error(f"{what} at {where}")
                    return r
                except (OSError, Short, _Transient, _urllib3_error()) as e:
                    if dl.passed():
                        raise dl.error(f"{what} at {where}") from None
                    if isinstance(e, (requests.ConnectionError, requests.Timeout, _Transient)):
                        raise
                    raise _Transient(f"the answer broke off: {e}") from None

        if ep.ns is None:
            r = retrying(call, f"{what} at {where}", transient=(requests.ConnectionError, requests.Timeout, _Transient))
        else:
            try:
                r = call()
            except (requests.ConnectionError, requests.Timeout) as e:
                if _cannot_connect(e):
                    raise _Unreachable(str(e)) from None
                raise RegistryError(f"{what} at {where}: {e}") from None
            except _Transient as e:
                raise RegistryError(f"{what} at {where}: {e}") from None
        if r.status_code in (401, 403):
            raise RegistryError(f"{what} at {where}: {'not authorized' if r.status_code == 401 else 'forbidden'}"
                                f" ({r.status_code}{': ' + _error_text(r) if _error_text(r) else ''})",
                                hint="check the credentials: SNAPBUILD_REGISTRY_USERNAME and "
                                     "SNAPBUILD_REGISTRY_PASSWORD, or `skopeo login` / `docker login`")
        if r.status_code not in ok and r.status_code != 404:
            raise RegistryError(f"{what} at {where}: {r.status_code} {r.reason} {_error_text(r)}".rstrip())
        return r

    def _authenticate(self, ep: _Endpoint, r, scope: str) -> str | None:
        """Answer a 401's WWW-Authenticate challenge: Basic with the credentials, or a
        Bearer token from the host's token service; the Authorization header, also kept
        for ``scope``'s next requests. None when there is no answer."""
        challenge = r.headers.get("WWW-Authenticate", "")
        kind, _, params = challenge.partition(" ")
        if kind.lower() == "basic":
            if not ep.creds:
                return None
            token = base64.b64encode(f"{ep.creds[0]}:{ep.creds[1]}".encode()).decode()
            with self._lock:
                ep.auth[scope] = answer = f"Basic {token}"
            return answer
        if kind.lower() == "bearer":
            fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
            if "realm" not in fields:
                return None
            # One scope parameter per scope: a mount needs the source's too.
            query = {"service": fields.get("service", ""), "scope": fields.get("scope", scope).split()}
            # The host's own TLS settings, where its token service is on the same host.
            realm = urlparse(fields["realm"])
            own = realm.netloc == ep.host.netloc
            tls = ep.tls if own else {}
            # Credentials go to a token service on another host only over HTTPS (or loopback):
            # a 401 can name any realm, and a plain-HTTP one would see the password.
            safe = own or realm.scheme == "https" or _is_loopback(realm.hostname or "")
            t = self.session.get(fields["realm"], params=query, auth=ep.creds if safe else None,
                                 timeout=self.timeout, stream=True, **tls)
            try:
                if t.status_code != 200:
                    return None
                body = json.loads(_document(t, f"asking {realm.netloc} for a token"))
            except ValueError:  # not a token service's answer: no answer
                return None
            finally:
                t.close()
            token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
            if not token:
                return None
            with self._lock:
                ep.auth[scope] = answer = f"Bearer {token}"
            return answer
        return None

    def _read(self, capability: str, what: str, attempt: Callable[[_Endpoint], T]) -> T:
        """``attempt(host)`` at each mirror that has ``capability``, in order, then at the
        origin: the first answer wins. A mirror's failure is a warning and the next host
        is asked; the origin's is the error."""
        for ep in self._mirrors:
            if ep.down or capability not in ep.host.capabilities:
                continue
            try:
                return attempt(ep)
            except _Unreachable as e:
                self._mark_down(ep, e)
            except SnapbuildError as e:
                log.warning("mirror %s: %s failed (%s); trying the next host", ep.root, what, e.message)
        return attempt(self._origin)

    def _mark_down(self, ep: _Endpoint, e: Exception) -> None:
        with self._lock:
            if ep.down:
                return
            ep.down = True
        log.warning("mirror %s cannot be reached (%s): not asking it again for %s; trying the next host",
                    ep.root, e, self.url)

    # -- blobs ---------------------------------------------------------------------------
    def has_blob(self, name: str, digest: str) -> bool:
        """At the origin: this is what a push asks."""
        r = self._request("HEAD", f"/{self._repo(name)}/blobs/{digest}", scope=self._scope(name, "pull"),
                          what=f"checking blob {digest[:19]}")
        if r.status_code == 200:
            self._seen[digest] = self._repo(name)
        return r.status_code == 200

    def get_blob(self, name: str, digest: str, *, size: int | None = None, into=None) -> bytes:
        size = size if size is not None else self.sizes.get(digest)
        return self._read("pull", f"fetching blob {digest} of {name}",
                          lambda ep: self._blob_at(ep, name, digest, size, into))

    def _blob_at(self, ep: _Endpoint, name: str, digest: str, size: int | None, into) -> bytes:
        where = f"{self._where(ep)}/{name}"
        sink = Sink(f"blob {digest} in {where}", size=size, into=into)

        def fetch(sink: Sink) -> None:
            r = self._request("GET", f"/{self._repo(name)}/blobs/{digest}", scope=self._scope(name, "pull"),
                              what=f"fetching blob {digest[:19]} of {name}", read=_into(sink), size=sink.limit,
                              at=ep)
            if r.status_code == 404:
                raise NotFound(f"blob {digest} of {name} is not in {self._where(ep)}",
                               hint="the snapshot is incomplete there: push it again")

        # A mirror is not asked twice: the next host is the second try.
        return read_verified(fetch, sink, digest, where, attempts=2 if ep.ns is None else 1)

    def _where(self, ep: _Endpoint) -> str:
        return self.url if ep.ns is None else f"mirror {ep.root}"

    def put_blob(self, name: str, digest: str, path: Path) -> bool:
        """Upload the blob; False when it was mounted from another repository instead."""
        repo, scope = self._repo(name), self._scope(name, "pull,push")
        what = f"uploading blob {digest[:19]} to {name}"
        source = self._seen.get(digest)
        # A blob another repository of this registry has is mounted, not sent; when the
        # registry cannot mount it, the same request opens an ordinary upload (202).
        query = f"?mount={digest}&from={source}" if source and source != repo else ""
        r = self._request("POST", f"/{repo}/blobs/uploads/{query}", scope=scope, what=what, ok=(202, 201))
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
        return self._read("pull", f"fetching manifest {digest} of {name}",
                          lambda ep: self._manifest_at(ep, name, digest))

    def _manifest_at(self, ep: _Endpoint, name: str, digest: str) -> bytes:
        where = f"{self._where(ep)}/{name}"
        sink = Sink(f"manifest {digest} in {where}")

        def fetch(sink: Sink) -> None:
            r = self._request("GET", f"/{self._repo(name)}/manifests/{digest}", scope=self._scope(name, "pull"),
                              what=f"fetching manifest {digest[:19]} of {name}", read=_into(sink),
                              headers={"Accept": MANIFEST_ACCEPT}, at=ep)
            if r.status_code == 404:
                raise NotFound(f"manifest {digest} of {name} is not in {self._where(ep)}")

        data = read_verified(fetch, sink, digest, where, attempts=2 if ep.ns is None else 1)
        self.sizes.note_bytes(data)
        return data

    def put_manifest(self, name: str, digest: str, data: bytes, tag: str | None) -> None:
        self._request("PUT", f"/{self._repo(name)}/manifests/{tag or digest}", scope=self._scope(name, "pull,push"),
                      what=f"writing manifest of {name}", ok=(201,), data=data,
                      headers={"Content-Type": json.loads(data).get("mediaType", MANIFEST_MEDIA_TYPE)})

    def resolve(self, ref: Ref) -> str:
        """A tag from the mirrors that may ``resolve``, a digest from those that may ``pull``
        (it is only checked for; the manifest itself is verified when fetched)."""
        return self._read("pull" if ref.digest else "resolve", f"resolving {ref}", lambda ep: self._resolve_at(ep, ref))

    def _resolve_at(self, ep: _Endpoint, ref: Ref) -> str:
        target = ref.digest or ref.tag
        r = self._request("HEAD", f"/{self._repo(ref.name)}/manifests/{target}",
                          scope=self._scope(ref.name, "pull"), what=f"resolving {ref}",
                          headers={"Accept": MANIFEST_ACCEPT}, at=ep)
        if r.status_code == 404:
            if ep.ns is not None:
                raise NotFound(f"{ref} is not in {self._where(ep)}")
            tags = ", ".join(t for t, _ in self.tagged(ref.name)) if not ref.digest else ""
            raise NotFound(f"{ref} is not in {self.url}" + (f" (tags: {tags or 'none'})" if not ref.digest else ""),
                           hint=f"list what is there with: snapbuild ls --registry {self.url}")
        digest = r.headers.get("Docker-Content-Digest")
        if ref.digest:
            return ref.digest
        if ep.ns is not None and digest and not _DIGEST.fullmatch(digest):
            digest = None  # a mirror's word is checked: hash the manifest instead
        if not digest:
            from .base import sha256_of

            digest = sha256_of(self._request("GET", f"/{self._repo(ref.name)}/manifests/{target}",
                                             scope=self._scope(ref.name, "pull"), what=f"resolving {ref}",
                                             headers={"Accept": MANIFEST_ACCEPT}, at=ep).content)
        return digest

    def referrers(self, name: str, digest: str) -> list[dict] | None:
        """Descriptors of the manifests whose ``subject`` is ``digest``, from the OCI 1.1
        referrers API; None when the registry does not offer it (it answers 404, as
        distribution 2.8 does: the spec forbids a 404 from a registry that has the API).
        A mirror's 404 only means it has no such API: the next host is asked (quietly),
        and when the origin cannot be reached after one, the answer is None (the
        referrers only name candidates: every signature is still verified)."""
        absent: list[str] = []
        answered: list[bool] = []

        def at(ep: _Endpoint) -> list[dict] | None:
            r = self._request("GET", f"/{self._repo(name)}/referrers/{digest}", scope=self._scope(name, "pull"),
                              what=f"listing referrers of {digest[:19]} in {name}",
                              headers={"Accept": "application/vnd.oci.image.index.v1+json"}, at=ep)
            answered.append(ep.ns is None)
            if r.status_code == 404 and ep.ns is not None:
                absent.append(ep.root)
                raise _NoAnswer()
            if r.status_code == 404:
                return None
            try:
                return list(r.json().get("manifests") or [])
            except ValueError:
                raise RegistryError(f"the referrers of {digest[:19]} in {self._where(ep)}/{name} "
                                    "are not an image index") from None

        for ep in self._mirrors:
            if ep.down or "pull" not in ep.host.capabilities:
                continue
            try:
                return at(ep)
            except _NoAnswer:
                log.debug("mirror %s has no referrers API; asking the next host", ep.root)
            except _Unreachable as e:
                self._mark_down(ep, e)
            except SnapbuildError as e:
                log.warning("mirror %s: listing referrers of %s failed (%s); trying the next host",
                            ep.root, digest, e.message)
        try:
            return at(self._origin)
        except RegistryError as e:
            if not absent or answered[-1:] == [True]:  # only an origin that cannot be reached
                raise
            log.warning("%s (mirror %s has no referrers API): going on as if the registry had none",
                        e.message, absent[0])
            return None

    def names(self) -> list[str]:
        out: list[str] = []
        path: str | None = "/_catalog?n=1000"
        while path:
            r = self._request("GET", path, scope="registry:catalog:*", what="listing repositories")
            if r.status_code == 404:
                break
            out += r.json().get("repositories") or []
            link = re.search(r"<([^>]+)>", r.headers.get("Link", ""))
            path = urljoin(self.base + "/", link.group(1)) if link else None
        pre = f"{self.prefix}/" if self.prefix else ""
        return sorted(n[len(pre):] for n in out if n.startswith(pre))

    def tagged(self, name: str) -> list[tuple[str, str]]:
        """From the origin alone, tags and what they name alike."""
        r = self._request("GET", f"/{self._repo(name)}/tags/list", scope=self._scope(name, "pull"),
                          what=f"listing tags of {name}")
        if r.status_code == 404:
            return []
        tags = sorted(r.json().get("tags") or [])
        return [(t, self._resolve_at(self._origin, Ref(name=name, tag=t))) for t in tags]

    def delete(self, ref: Ref) -> None:
        """The OCI API deletes manifests by digest: every tag pointing at it goes too
        (the digest is the origin's, never a mirror's)."""
        digest = self._resolve_at(self._origin, ref)
        r = self._request("DELETE", f"/{self._repo(ref.name)}/manifests/{digest}",
                          scope=self._scope(ref.name, "pull,push,delete"), what=f"deleting {ref}", ok=(202, 200))
        if r.status_code == 404:
            raise NotFound(f"{ref} is not in {self.url}")

    def _scope(self, name: str, actions: str) -> str:
        return f"repository:{self._repo(name)}:{actions}"


class _NoAnswer(Exception):
    """A mirror without the referrers API."""


def _into(sink: Sink):
    """A ``_request`` reader that copies the answer into ``sink``."""
    return lambda r: sink.take(lambda n: r.raw.read(n, decode_content=False), length=r.headers.get("Content-Length"),
                               encoding=r.headers.get("Content-Encoding"))


def _document(r, what: str) -> bytes:
    """A (streamed) answer's body, at most DOCUMENT_MAX bytes."""
    sink = Sink(what)
    _into(sink)(r)
    return sink.value()


def _bounded_redirect(r, *args, **kw):
    """requests reads a redirect's body whole (and decoded) before it follows it: read
    it here first, bounded, so that it has nothing left to read."""
    if r.is_redirect and not r._content_consumed:
        r._content = _document(r, f"a redirect from {r.url}")
        r._content_consumed = True
    return r


def _urllib3_error() -> type[Exception]:
    import urllib3

    return urllib3.exceptions.HTTPError


_POOLS: dict = {}


def _watched_pools() -> dict:
    """urllib3 pool classes whose connections let the current request's deadline cut
    them (bounds.watch) as the answer's headers start to be read: a deadline then ends
    a read blocked anywhere in the answer."""
    if not _POOLS:
        from urllib3.connection import HTTPConnection, HTTPSConnection
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        def watched(cls: Any) -> Any:
            class Watched(cls):
                def getresponse(self, *args, **kw):
                    watch(self.sock)
                    return super().getresponse(*args, **kw)

            return Watched

        _POOLS["http"] = type("WatchedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": watched(HTTPConnection)})
        _POOLS["https"] = type("WatchedHTTPSPool", (HTTPSConnectionPool,),
                               {"ConnectionCls": watched(HTTPSConnection)})
    return _POOLS


def _cannot_connect(e: Exception) -> bool:
    """Whether a requests error means the host cannot be spoken to at all (refused, no
    route, no name, TLS refused, or it does not answer in time), rather than one
    connection that broke."""
    import requests
    import urllib3

    if isinstance(e, (requests.Timeout, requests.exceptions.SSLError, requests.exceptions.ProxyError)):
        return True
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


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
