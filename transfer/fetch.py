"""The fetch pipeline: the signed manifest decides what is downloaded, the root process decides what is kept.

Transport-agnostic (a `Transport` gets named files of one location): the
signature (and a release statement, if the location has one) is fetched first
and verified against the model's trust policy by trust.verify_manifest, with
rollback checked against the recorded version; then exactly the files the
manifest names are requested, each hashed while it streams into the store,
cut at the first byte past its signed size (shards signatures sign it; for
`files` signatures the policy's max_bytes bounds the whole model) and refused
on a digest mismatch before anything is linked under a digest name. Nothing
the manifest does not name is ever requested. Interrupted transfers are
resumed from the byte reached (the digests still cover the whole file).

The result is a view in the store, which the caller then loads through
trust.verify_model like any local model directory (`store_policy`).
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote, urlsplit

from ..trust import TrustPolicy, VerificationError
from ..trust._hashing import new_hasher
from ..trust._storage import MAX_METADATA_BYTES
from ..trust.verifying import SignedManifest, verify_manifest
from .store import Store

SCHEMES = ("https://", "oci://", "sftp://")   # what this build fetches from
KNOWN = ("https://", "oci://", "sftp://")
ATTEMPTS = 5               # per file: the first try and four resumes
BACKOFF_S = (0.5, 1, 2, 4)


# oci://HOST[:PORT]/REPOSITORY:TAG or @sha256:HEX (the distribution spec's repository name grammar).
OCI_REFERENCE = re.compile(r"^oci://([^/@:]+(?::[0-9]{1,5})?)/([a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                           r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
                           r"(?::([A-Za-z0-9_][A-Za-z0-9._-]{0,127})|@(sha256:[0-9a-f]{64}))$")


def file_where(location: str, name: str) -> str:
    """How messages name a file of a location: URL + name, or (OCI) reference#title."""
    return location + ("#" if location.startswith("oci://") else "") + name


class Interrupted(Exception):
    """A transient transport failure: the file is resumed from the byte reached (or restarted)."""

    def __init__(self, detail: str, restart: bool = False):
        super().__init__(detail)
        self.restart = restart  # the server cannot resume: start the file again


class Refused(Exception):
    """A permanent transport failure or refusal (bad certificate, redirect off the policy, 404)."""


class Transport(Protocol):
    peer: str | None   # who answered (address and TLS certificate subject), for the audit log

    def metadata(self, name: str, limit: int) -> bytes | None: ...       # None: the location has no such file
    def stream(self, name: str, offset: int) -> Iterator[bytes]: ...      # raises Interrupted, Refused
    def close(self) -> None: ...


@dataclass
class Fetched:
    location: str
    view: str                       # the model's directory in the store
    signed: SignedManifest
    peer: str | None
    files: dict[str, str]           # signed name -> sha256 hex of the stored blob
    downloaded: int = 0             # bytes received (resumed parts counted once)
    reused: list[str] = field(default_factory=list)  # names already in the store, never requested


def check_location(location: str, policy: TrustPolicy) -> str:
    """The location as a directory URL ('/'-terminated), if the policy allows it; refused before any connection."""
    lower = location.lower()
    if not lower.startswith(KNOWN):
        scheme = urlsplit(location).scheme or "no scheme"
        raise VerificationError(location, "source", f"{scheme}:// is not a secure transfer; only https://, oci:// and "
                                "sftp:// locations are fetched (http, ftp and file are refused)"
                                if scheme != "no scheme" else "not a URL (https://, oci:// or sftp://)")
    if not lower.startswith(SCHEMES):
        raise VerificationError(location, "source", f"{location.split('://')[0]}:// locations are not fetched by this "
                                "version of sealbox; use https://, oci:// or sftp://")
    problem = path_problem(location)
    if problem:
        raise VerificationError(location, "source", problem)
    if lower.startswith("sftp://"):
        location = _check_sftp(location)
    elif lower.startswith("oci://"):
        if not OCI_REFERENCE.match(location):
            raise VerificationError(location, "source", "must be oci://REGISTRY/REPOSITORY:TAG or "
                                    "oci://REGISTRY/REPOSITORY@sha256:DIGEST")
    else:
        location = _check_https(location)
    if not under_any(location, policy.source_urls):
        allowed = ", ".join(policy.source_urls) or "none configured"
        raise VerificationError(location, "source", f"not under an allowed source URL ({allowed})")
    return location


def _check_sftp(location: str) -> str:
    parts = urlsplit(location)
    if not parts.hostname or not parts.username or parts.password is not None or parts.query or parts.fragment:
        raise VerificationError(location, "source", "must be sftp://USER@HOST[:PORT]/PATH/ (key authentication "
                                "only: no password in the URL), without query or fragment")
    if not parts.path.startswith("/"):
        raise VerificationError(location, "source", "the path must be absolute, without '..'")
    return location if location.endswith("/") else location + "/"


def _check_https(location: str) -> str:
    parts = urlsplit(location)
    if not parts.hostname or parts.query or parts.fragment or parts.username or parts.password:
        raise VerificationError(location, "source", "must be https://HOST[:PORT]/PATH/ without user, query or fragment")
    return location if location.endswith("/") else location + "/"


# Encodings a server decodes into a dot, a slash or a backslash (nginx turns /models/%2e%2e/x into /x),
# or a NUL: refused in every location, source prefix and redirect target, never decoded and compared.
_ENCODED = re.compile(r"%(?:2e|2f|5c|00)", re.IGNORECASE)
DEFAULT_PORTS = {"https": 443, "oci": 443, "sftp": 22}


def path_problem(url: str) -> str | None:
    """Why a location, prefix or redirect target's path cannot be compared segment by segment, or None."""
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as e:
        return f"not a valid URL ({e})"
    if _ENCODED.search(parts.path) or "\\" in parts.path:
        return "a percent-encoded '.', '/', '\\' or NUL, or a backslash, in the path is refused (servers decode them)"
    if "%" in parts.netloc.rpartition("@")[2]:
        return "a percent-encoded host is refused"
    if ".." in (unquote(s) for s in parts.path.split("/")):
        return "a '..' path segment is refused"
    return None


def _split(url: str) -> tuple[tuple, list[str], str | None] | None:
    """(scheme, user, host, port), the unquoted path segments, and an OCI reference's tag or digest;
    None if the URL is not comparable (see path_problem)."""
    if path_problem(url) is not None:
        return None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    path, ref = parts.path, None
    if scheme == "oci":   # REPOSITORY:TAG or @DIGEST: the repository's components are the segments
        path, at, digest = path.partition("@")
        head, _, last = path.rpartition("/")
        if at:
            ref = digest
        elif ":" in last:
            last, ref = last.split(":", 1)
        path = f"{head}/{last}"
    segments = [unquote(s) for s in path.split("/")[1:]]
    if segments and segments[-1] == "":
        segments.pop()   # a directory's trailing slash
    user = unquote(parts.username) if scheme == "sftp" and parts.username else None
    return (scheme, user, parts.hostname, parts.port or DEFAULT_PORTS[scheme]), segments, ref


def under(url: str, prefix: str) -> bool:
    """Whether url is at or below the source prefix: the same scheme, host and port (and SFTP user, if
    the prefix names one), and the prefix's whole path segments first, so https://h/team does not
    cover https://h/team-evil/ nor https://h.evil.net/. An OCI prefix naming a tag or digest covers
    only that reference."""
    u, p = _split(url), _split(prefix)
    if u is None or p is None:
        return False
    (scheme, user, host, port), segments, ref = u
    (p_scheme, p_user, p_host, p_port), p_segments, p_ref = p
    if (scheme, host, port) != (p_scheme, p_host, p_port) or (p_user is not None and user != p_user):
        return False
    if p_ref is not None:
        return segments == p_segments and ref == p_ref
    return segments[:len(p_segments)] == p_segments


def under_any(url: str, prefixes) -> bool:
    return any(under(url, p) for p in prefixes)


def under_sources(url: str, source_urls) -> bool:
    """A redirect target is followed only to an https:// location the policy also trusts (its source_urls)."""
    return url.lower().startswith("https://") and under_any(url, source_urls)


def metadata_name(policy_name: str) -> str:
    """A remote model's signature and release files are named relative to its location."""
    return os.path.basename(policy_name)


def store_policy(policy: TrustPolicy, store: Store) -> TrustPolicy:
    """The policy a fetched view is verified with: the store's views are the (only) source."""
    return dataclasses.replace(policy, sources=(os.path.realpath(store.views),), source_urls=(),
                               signature=metadata_name(policy.signature), release=metadata_name(policy.release))


def fetch_model(name: str, location: str, policy: TrustPolicy, store: Store, transport: Transport,
                state_dir: str | None, progress: Callable[[str, int, int | None], None] | None = None,
                now=None, timeout_s: float | None = None, started: float | None = None) -> Fetched:
    """Fetches a model into the store; raises VerificationError (check 'transfer' for transport failures).

    timeout_s bounds the whole fetch from `started` (time.monotonic(); default now: the daemon counts
    the wait for a fetch slot in), checked per chunk and between retries; a stalled read is bounded
    by the transport's read timeout."""
    location = check_location(location, policy)
    deadline = None if timeout_s is None else (time.monotonic() if started is None else started) + timeout_s

    def in_time(url: str) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise VerificationError(url, "transfer", f"the fetch took longer than its {timeout_s:g} s")
    sig_name, release_name = metadata_name(policy.signature), metadata_name(policy.release)
    try:
        sig = release = None
        if policy.require_signature:
            sig = _retrying(file_where(location, sig_name), lambda: transport.metadata(sig_name, MAX_METADATA_BYTES), in_time)
            if sig is None:
                raise VerificationError(file_where(location, sig_name), "transfer", "missing (the location has no signature)")
            release = _retrying(file_where(location, release_name), lambda: transport.metadata(release_name, MAX_METADATA_BYTES),
                                in_time)
        signed = verify_manifest(name, file_where(location, ""), sig, release, policy, state_dir, now)
        manifest = signed.manifest
        if len(manifest.resources) > policy.max_files:
            raise VerificationError(file_where(location, sig_name) if policy.require_signature else location, "size",
                                    f"names {len(manifest.resources)} files, more "
                                    f"than the policy's max_files {policy.max_files}; none requested")
        if "." in manifest.resources:
            raise VerificationError(file_where(location, sig_name), "manifest", "a single-file model cannot be fetched from a "
                                    "directory location; sign it inside a directory")
        result = Fetched(location, "", signed, None, {})
        budget = policy.max_bytes
        for res in sorted(manifest.resources, key=lambda n: n.split("/")):
            digests = manifest.resources[res]
            if manifest.method == "files" and manifest.hash_type == "sha256" and store.has(digests[(0, None)].hex()):
                result.files[res] = digests[(0, None)].hex()  # already stored: never requested
                result.reused.append(res)
                budget -= os.path.getsize(store.blob_path(result.files[res]))
                continue
            hexdigest, size, received = _fetch_file(location, res, manifest, store, transport, budget, policy,
                                                    progress, in_time)
            result.files[res] = hexdigest
            result.downloaded += received
            budget -= size
        result.peer = transport.peer
        meta = {sig_name: sig} if sig is not None else {}
        if release is not None:
            meta[release_name] = release
        result.view = store.make_view(name, result.files, meta)
        return result
    except Refused as e:
        raise VerificationError(location, "transfer", str(e)) from None
    except OSError as e:
        raise VerificationError(location, "io", f"the store: {e.strerror or e}") from None


def _retrying(url: str, call, in_time=lambda url: None):
    for attempt in range(1, ATTEMPTS + 1):
        in_time(url)
        try:
            return call()
        except Interrupted as e:
            if attempt == ATTEMPTS:
                raise VerificationError(url, "transfer", f"interrupted {ATTEMPTS} times, last: {e}") from None
            time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1])


def _fetch_file(location: str, res: str, manifest, store: Store, transport: Transport, budget: int,
                policy: TrustPolicy, progress, in_time) -> tuple[str, int, int]:
    """Streams one signed file into a blob; returns (sha256 hex, size, bytes received)."""
    url = file_where(location, res)
    shards = manifest.method == "shards"
    signed = manifest.resources[res]
    size = max(end for _, end in signed) if shards else None  # shards sign the file's size
    limit = size if shards else budget

    # A sha256 `files` signature signs the very digest the store computes anyway: hash once.
    same_hash = not shards and manifest.hash_type == "sha256"

    def fresh():
        if shards:
            return {"start": 0, "hasher": new_hasher(manifest.hash_type)}
        return None if same_hash else new_hasher(manifest.hash_type)

    received = 0
    with store.writer() as w:
        state = fresh()
        attempt = 0
        while True:
            try:
                for chunk in transport.stream(res, w.size):
                    in_time(url)
                    if w.size + len(chunk) > limit:
                        if shards:
                            raise VerificationError(url, "size", f"longer than the {size} bytes signed; cut at byte {size}")
                        raise VerificationError(url, "size", f"more than the policy's max_bytes {policy.max_bytes} "
                                                "for the whole model; cut there")
                    if shards:
                        _shard_update(url, chunk, w.size, state, signed, manifest)
                    else:
                        if state is not None:
                            state.update(chunk)
                    w.write(chunk)
                    received += len(chunk)
                    if progress:
                        progress(res, len(chunk), size)
                break
            except Interrupted as e:
                attempt += 1
                if attempt >= ATTEMPTS:
                    raise VerificationError(url, "transfer", f"interrupted {ATTEMPTS} times, last: {e}") from None
                if e.restart:
                    w.truncate(0)
                    state = fresh()
                time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1])
                in_time(url)
        if shards:
            if w.size != size:
                raise VerificationError(url, "size", f"{w.size} bytes, shorter than the {size} bytes signed")
            if size and state["start"] < size:
                _shard_check(url, state, signed, manifest, size)
        elif (w.sha256 if same_hash else state).digest() != signed[(0, None)]:
            pinned = "signed" if policy.require_signature else "pinned"
            raise VerificationError(url, "digest", f"{manifest.hash_type} digest differs from the {pinned} one; "
                                    "not stored")
        return w.commit(), w.size, received


def _shard_update(url: str, chunk: bytes, offset: int, state: dict, signed: dict, manifest) -> None:
    """Feeds a chunk to the current shard's hasher, checking each shard as soon as its last byte is in."""
    shard = manifest.shard_size
    view = memoryview(chunk)
    while view:
        end = state["start"] + shard
        take = min(len(view), end - offset)
        state["hasher"].update(view[:take])
        view, offset = view[take:], offset + take
        if offset == end:
            _shard_check(url, state, signed, manifest, end)


def _shard_check(url: str, state: dict, signed: dict, manifest, end: int) -> None:
    start = state["start"]
    if signed.get((start, end)) != state["hasher"].digest():
        raise VerificationError(f"{url} bytes {start}-{end}", "digest", f"{manifest.hash_type} digest differs from "
                                "the signed one; refused at the end of this shard, not stored")
    state["start"], state["hasher"] = end, new_hasher(manifest.hash_type)
