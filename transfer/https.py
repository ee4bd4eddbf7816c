"""HTTPS transport (urllib3): verified TLS, redirects followed by hand, timeouts, Range resume.

urllib3 is asked to follow no redirect and retry nothing: a redirect is
followed here only to an https:// URL under one of the policy's source URL
prefixes, compared by host, port and whole path segments (fetch.under), its
path free of '..' and of encoded dots and slashes (Python's requests and
urllib follow an https -> http redirect silently), and retries are the fetch pipeline's, which resumes from the byte
it reached. The body's length is enforced (urllib3 raises on a connection
closed early, where urllib + shutil.copyfileobj return half a file with no
error). TLS is verified against the system CAs or a pinned CA bundle.
"""
from __future__ import annotations

import ssl
from collections.abc import Iterator
from urllib.parse import urljoin, urlsplit

import urllib3

from .fetch import Interrupted, Refused, path_problem, under_sources

CHUNK = 1 << 20
MAX_REDIRECTS = 5
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class HttpsTransport:
    def __init__(self, location: str, allowed: tuple[str, ...], ca_bundle: str | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 30.0, cadata: str | None = None):
        self.location = location   # checked by fetch.check_location: https://, '/'-terminated
        self.allowed = allowed     # the policy's source URL prefixes, for redirects
        # CERT_REQUIRED, hostname checked; a pinned bundle (a file, or its PEM text) replaces the system CAs.
        ctx = ssl.create_default_context(cafile=ca_bundle, cadata=cadata)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.pool = urllib3.PoolManager(ssl_context=ctx, retries=False, maxsize=2,
                                        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout))
        self.peer: str | None = None

    def close(self) -> None:
        self.pool.clear()

    def _get(self, name: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        url = self.location + name
        for _ in range(MAX_REDIRECTS + 1):
            try:
                r = self.pool.request("GET", url, headers=headers, preload_content=False, redirect=False,
                                      retries=False, decode_content=False)
            except urllib3.exceptions.SSLError as e:
                raise Refused(f"TLS: {_reason(e)}") from None
            except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError,
                    urllib3.exceptions.NewConnectionError) as e:
                raise Interrupted(_reason(e)) from None
            except urllib3.exceptions.HTTPError as e:
                raise Refused(_reason(e)) from None
            self._note_peer(r, url)
            if r.status in (301, 302, 303, 307, 308):
                target = urljoin(url, r.headers.get("Location", ""))
                _discard(r)
                problem = path_problem(target)
                if problem:
                    raise Refused(f"{url} redirects to {target}: {problem}; not followed")
                if not under_sources(target, self.allowed):
                    raise Refused(f"{url} redirects to {target}, which is not an https:// location under the "
                                  "policy's sources; not followed")
                url = target
                continue
            return r
        raise Refused(f"{self.location + name}: more than {MAX_REDIRECTS} redirects")

    def _note_peer(self, r, url: str) -> None:
        if self.peer is not None:
            return
        sock = getattr(getattr(r, "connection", None), "sock", None)
        subject = ""
        try:
            cert = sock.getpeercert() if sock is not None else None
            if cert:
                subject = " " + ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
            addr = sock.getpeername() if sock is not None else None
        except (OSError, ValueError):
            addr = None
        host = urlsplit(url).netloc
        self.peer = f"{host} ({addr[0]}:{addr[1]}){subject}" if addr else host + subject

    def metadata(self, name: str, limit: int, headers: dict[str, str] | None = None) -> bytes | None:
        r = self._get(name, headers or {})
        try:
            if r.status == 404:
                return None
            if r.status != 200:
                raise (Interrupted if r.status in TRANSIENT_STATUS else Refused)(f"{r.geturl() or name}: HTTP {r.status}")
            data = r.read(limit + 1)
            if len(data) > limit:
                raise Refused(f"{self.location + name}: more than the {limit} bytes allowed for metadata")
            return data
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError) as e:
            raise Interrupted(_reason(e)) from None
        finally:
            _discard(r)

    def stream(self, name: str, offset: int) -> Iterator[bytes]:
        r = self._get(name, {"Range": f"bytes={offset}-"} if offset else {})
        try:
            if r.status in TRANSIENT_STATUS:
                raise Interrupted(f"{self.location + name}: HTTP {r.status}")
            if offset and r.status == 200:
                raise Interrupted("the server ignores Range; restarting the file", restart=True)
            if offset and r.status == 206:
                content_range = r.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {offset}-"):
                    raise Refused(f"{self.location + name}: Content-Range {content_range!r} does not start at {offset}")
            elif r.status != 200:
                raise Refused(f"{self.location + name}: HTTP {r.status}")
            while True:
                chunk = r.read(CHUNK)
                if not chunk:
                    break
                yield chunk
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError, urllib3.exceptions.ReadTimeoutError) as e:
            raise Interrupted(_reason(e)) from None
        finally:
            _discard(r)


def _discard(r) -> None:
    """Back to the pool only a connection whose response was read to its end; else closed."""
    if not r.isclosed():
        r.close()
    r.release_conn()


def _reason(e: Exception) -> str:
    """urllib3's reason, bounded (it names the URL, never anything of this host)."""
    return str(e)[:300]
