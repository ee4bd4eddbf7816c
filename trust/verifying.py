"""verify_model: every check a model passes before any worker sees it.

Order: the source against the policy (a walk down from the source root, each
directory opened O_NOFOLLOW relative to its parent and checked, before any
file is opened for its content), storage checks while opening, the legacy
format refused by its predicate, the signature (or the operator's pinned
digests) and the signed model name (if the policy binds one), the manifest
digest pin, the signed file set against the files present (ignore paths
dropped), the rollback check (a signed release, or the version the operator
states), hashing (into sealed memfds, or with seal=False only hashing: the
same digests and the same checks, for `sealbox verify`), the digests; only then is the version
recorded (or, with record_version=False, by the caller through record_version once the
model actually serves: the daemon records it when the new worker is READY). One audit event per
decision; every failure, a bug included, leaves as a VerificationError.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._hashing import hash_into_memfds, ranges
from ._oms import Manifest, check_name, is_ignored, parse_bundle, parse_statement, refuse_legacy_format, verify_bundle
from ._rollback import VersionStore, check_version, parse_release
from ._storage import Source, Tree, open_tree, read_checked, resolve_symlinks, walk_source
from .errors import VerificationError
from .policy import TrustPolicy, parse_version

__all__ = ["AuditSink", "SignedManifest", "VerificationError", "VerifiedModel", "verify_manifest", "verify_model",
           "record_version", "check_source", "parse_pin_manifest", "inside"]

_state_lock = threading.Lock()  # one read-check-record of versions.json at a time


class AuditSink(Protocol):
    """Where verify_model reports each decision (the daemon's AuditLog, say): one event per call."""

    def event(self, event: str, /, **fields: Any) -> Any: ...


@dataclass
class VerifiedModel:
    name: str
    source: str                  # the real path that was verified
    files: dict[str, int]        # signed relative POSIX name -> sealed memfd (CLOEXEC), owned here; {} unless sealed
    sizes: dict[str, int]        # signed relative POSIX name -> size: every verified file
    version: str | None
    signer: str | None           # pinned identity or "key:sha256:<fingerprint>"; None when pinned by digest
    digest: str                  # "sha256:<hex>": OMS subject digest, or the same over the pinned digests
    ignored: tuple[str, ...] = ()  # present but under ignore_paths: never verified, never handed over
    record_digest: str | None = None  # recorded with the version when the operator stated it
    hash_s: float = 0.0          # seconds spent hashing (and sealing) the files
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for fd in self.files.values():
                os.close(fd)

    def __enter__(self) -> "VerifiedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def check_source(model_dir: str, policy: TrustPolicy) -> Source:
    """Opens the model's place by walking down from the allowed source it lies under (the caller closes it).

    The source roots are real paths (the config resolved them once). The model
    path is taken as written, made absolute: the deepest root it lies under is
    where the walk starts; failing that, the longest leading part of it that
    resolves to a root (a symlink above the root). Below the root, walk_source
    follows no symlink and checks every directory's owner and mode.
    """
    given = os.path.normpath(os.path.abspath(model_dir))
    for root in sorted(policy.sources, key=len, reverse=True):
        rel = inside(given, root)
        if rel is not None:
            return walk_source(root, [] if rel == "." else rel.split("/"))
    head, names = given, []
    while True:
        if os.path.realpath(head) in policy.sources:
            return walk_source(os.path.realpath(head), names)
        if head == "/":
            break
        head, name = os.path.split(head)
        names.insert(0, name)
    real = os.path.realpath(model_dir)
    allowed = ', '.join(policy.sources) or 'none configured'
    for root in policy.sources:
        if inside(real, root) is not None:
            raise VerificationError(model_dir, "source", f"resolves to {real}, under the source {root} only through a "
                                    "symlink below it; name the model by its path below the source")
    raise VerificationError(model_dir, "source", f"resolves to {real}, which is not under an allowed source ({allowed})")


def inside(path: str, root: str) -> str | None:
    """The relative name of `path` if it lies inside the directory `root`."""
    rel = os.path.relpath(path, root)
    return None if rel == ".." or rel.startswith("../") or os.path.isabs(rel) else rel


_PIN_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def parse_pin_manifest(data: bytes, where: str) -> dict[str, str]:
    """sha256sum format ("HEX  NAME"), '#' comments: what `sealbox hash` prints."""
    pins: dict[str, str] = {}
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise VerificationError(where, "pin", "not UTF-8 text") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _PIN_LINE.match(line)
        if not m:
            raise VerificationError(where, "pin", f"line {n} is not 'SHA256HEX  NAME'")
        if m.group(2) in pins:
            raise VerificationError(where, "pin", f"line {n}: duplicate name {m.group(2)!r}")
        pins[m.group(2)] = m.group(1)
    if not pins:
        raise VerificationError(where, "pin", "pins no file")
    return pins


def _pinned_manifest(policy: TrustPolicy, real: str | None) -> tuple[Manifest, str]:
    """`real`: the model directory (None for a model not yet fetched)."""
    if policy.pinned_manifest is not None:
        where = policy.pinned_manifest
        if real is not None and inside(os.path.realpath(where), real) is not None:
            raise VerificationError(where, "pin", "the pin manifest is inside the model directory it pins")
        pins = parse_pin_manifest(read_checked(where), where)
    else:
        where = f"{policy.where}: pinned_files"
        pins = dict(policy.pinned_files or ())
    names = sorted(pins, key=lambda n: n.split("/"))
    resources = {check_name(n, where): {(0, None): bytes.fromhex(pins[n])} for n in names}
    digest = hashlib.sha256(b"".join(bytes.fromhex(pins[n]) for n in names)).hexdigest()
    return Manifest(os.path.basename(real or ""), digest, "files", "sha256", None, False, (), resources), where


def verify_model(name: str, model_dir: str, policy: TrustPolicy, state_dir: str | None, audit: AuditSink | None,
                 now: datetime.datetime | None = None, record_version: bool = True,
                 store_links: bool = False, seal: bool = True) -> VerifiedModel:
    """Verifies one model; raises VerificationError naming the file and the check.

    state_dir=None skips the rollback state (the publisher's `verify`). record_version=False checks
    the version against the state but leaves recording it to the caller (the function record_version).
    store_links=True: the model is a view of the daemon's content-addressed store (sealbox.transfer),
    whose read-only files have hard links into the store.
    seal=False hashes without copying into memfds (`sealbox verify`, which hands nothing over): the
    same reads, digests and verdict, and a VerifiedModel whose `files` is empty."""
    record = {"model": name, "source": model_dir, "policy": policy.describe()}
    source: Source | None = None
    tree: Tree | None = None
    hashed = None
    try:
        source = check_source(model_dir, policy)
        real = source.path
        record["source"] = real
        base = os.path.dirname(real) if source.single_file else real
        sig_path = os.path.join(base, policy.signature)
        release_path = os.path.join(base, policy.release)
        # Our metadata files are never model files, whatever the bundle says.
        exclude = {r for r in (inside(sig_path, real), inside(release_path, real)) if r}

        sig_bytes = read_checked(sig_path) if policy.require_signature else None
        release_bytes = None
        if policy.require_signature and os.path.lexists(release_path):
            release_bytes = read_checked(release_path)
        tree = open_tree(real, exclude, at=source.at, store_links=store_links)

        manifest, manifest_where, signer = _manifest(policy, sig_bytes, sig_path, real, record, now)
        digest = f"sha256:{manifest.subject_digest}"

        # Files under the signed (or the policy's) ignore_paths are not
        # authenticated: they are dropped, never handed over.
        ignored = manifest.ignore_paths + policy.ignore_paths
        dropped = sorted([n for n in tree.files if is_ignored(n, ignored)]
                         + [n for n in tree.symlinks if is_ignored(n, ignored)])
        for n in [n for n in tree.files if is_ignored(n, ignored)]:
            tree.drop(n)
        for n in [n for n in tree.symlinks if is_ignored(n, ignored)]:
            del tree.symlinks[n]
        if dropped:
            record["ignored"] = dropped  # named in the audit event: present, never verified, never handed over
        resolve_symlinks(tree, manifest.allow_symlinks)
        _check_file_set(tree, manifest, real)

        total = sum(f.size for f in tree.files.values())
        if total > policy.max_bytes:
            raise VerificationError(real, "size", f"{total} bytes, more than the policy's max_bytes {policy.max_bytes}")

        version, stated = _check_version(name, release_bytes, release_path, real, policy, signer, manifest, now,
                                         state_dir, record)
        store = VersionStore(state_dir) if state_dir is not None else None

        started = time.monotonic()
        hashed = hash_into_memfds(list(tree.files.values()), manifest.hash_type, manifest.shard_size, keep=seal)
        hash_s = time.monotonic() - started
        for n, h in hashed.items():
            signed = manifest.resources[n]
            got = h.digests if manifest.method == "shards" else {(0, None): h.digests[(0, h.size)]}
            for rng, want in signed.items():
                if got[rng] != want:
                    where = tree.files[n].path + (f" bytes {rng[0]}-{rng[1]}" if manifest.method == "shards" else "")
                    raise VerificationError(where, "digest", f"{manifest.hash_type} digest differs from the one in {manifest_where}")

        if record_version and store is not None and version is not None:
            with _state_lock:
                store.record(name, version, digest if stated else None)
        label = (lambda n: os.path.basename(real)) if tree.single_file else (lambda n: n)
        model = VerifiedModel(name, real, {label(n): h.memfd for n, h in hashed.items() if h.memfd >= 0},
                              {label(n): h.size for n, h in hashed.items()}, version, signer, digest,
                              tuple(dropped), record_digest=digest if stated else None, hash_s=hash_s)
        hashed = None  # owned by `model` now
        if audit:
            audit.event("model.verify", **record, verdict="accepted", reason="all checks passed", files=len(model.sizes),
                        hash_s=round(hash_s, 4))
        return model
    except VerificationError as e:
        if audit:
            audit.event("model.verify", **record, verdict="refused", reason=str(e), check=e.check)
        raise
    except OSError as e:
        if audit:
            audit.event("model.verify", **record, verdict="refused", reason=f"I/O error: {e}", check="io")
        raise VerificationError(e.filename or model_dir, "io", e.strerror or str(e)) from None
    except Exception as e:
        # A bug, not a verdict on the model: still audited, still a refusal with a reason
        # (never an exception escaping to the daemon's RPC or a traceback on the CLI).
        refusal = VerificationError(record["source"], "internal", f"verification failed: {e!r}")
        if audit:
            audit.event("model.verify", **record, verdict="refused", reason=str(refusal), check="internal")
        raise refusal from e
    finally:
        if source is not None:
            source.close()
        if tree is not None:
            tree.close()
        if hashed:
            for h in hashed.values():
                if h.memfd >= 0:
                    os.close(h.memfd)


def _manifest(policy: TrustPolicy, sig_bytes: bytes | None, sig_path: str, real: str | None, record: dict,
              now) -> tuple[Manifest, str, str | None]:
    """The signed manifest (signature verified against the policy, name and manifest digest pins
    checked), or the operator's pins as one; with the signer (None when pinned)."""
    signer = None
    if sig_bytes is not None:
        bundle = parse_bundle(sig_bytes, sig_path)
        refuse_legacy_format(bundle)  # by its predicate, before its signature fails for another reason
        signer = verify_bundle(bundle, policy, now)
        record["signer"] = signer
        manifest, manifest_where = parse_statement(bundle.payload, sig_path), sig_path
        _check_name(manifest, sig_path, policy)
    else:
        manifest, manifest_where = _pinned_manifest(policy, real)
    digest = f"sha256:{manifest.subject_digest}"
    record["digest"] = digest
    if policy.manifest_digest is not None and digest != policy.manifest_digest:
        raise VerificationError(manifest_where, "pin", f"manifest digest {digest} is not the manifest_digest "
                                f"{policy.manifest_digest} the policy pins")
    return manifest, manifest_where, signer


def _check_version(name: str, release_bytes: bytes | None, release_path: str, real: str, policy: TrustPolicy,
                   signer: str | None, manifest: Manifest, now, state_dir: str | None,
                   record: dict) -> tuple[str | None, bool]:
    """The model's version (signed release, or stated by the operator), checked against rollback."""
    version, stated = None, False
    if release_bytes is not None:
        version = _check_release(name, release_bytes, release_path, policy, signer, manifest, now)
        if policy.version is not None and parse_version(policy.version) != parse_version(version):
            raise VerificationError(release_path, "rollback", f"the signed release says version {version}, "
                                    f"the policy states version {policy.version}")
    elif policy.version is not None:
        # No release statement (an upstream-signed model, say): the operator states the version.
        version, stated = policy.version, True
    record["version"] = version
    if stated:
        record["version_stated"] = True
    rollback_where = real if stated else release_path
    store = VersionStore(state_dir) if state_dir is not None else None
    digest = f"sha256:{manifest.subject_digest}"
    with _state_lock:
        recorded = store.entry(name) if store else None
        check_version(name, version, rollback_where, policy, recorded[0] if recorded else None,
                      stated=stated, digest=digest, recorded_digest=recorded[1] if recorded else None)
    return version, stated


@dataclass(frozen=True)
class SignedManifest:
    """What a model must consist of, decided before any of its files exists here (sealbox.transfer)."""
    manifest: Manifest
    signer: str | None
    digest: str          # "sha256:<hex>", as VerifiedModel.digest
    version: str | None


def verify_manifest(name: str, prefix: str, sig_bytes: bytes | None, release_bytes: bytes | None,
                    policy: TrustPolicy, state_dir: str | None, now: datetime.datetime | None = None) -> SignedManifest:
    """The checks of verify_model that need no model file: the signature (or the policy's pins), the
    name and manifest digest pins, the release statement and rollback; nothing is recorded.

    `prefix` + a file name names that file in messages (a directory URL, or an OCI reference + '#');
    the signature and release are policy.signature and policy.release there. verify_model still runs
    every check again on the fetched files."""
    record: dict = {}
    model_where = prefix.rstrip("#")
    try:
        manifest, _, signer = _manifest(policy, sig_bytes if policy.require_signature else None,
                                        prefix + os.path.basename(policy.signature), None, record, now)
        version = _check_version(name, release_bytes, prefix + os.path.basename(policy.release), model_where, policy,
                                 signer, manifest, now, state_dir, record)[0]
    except VerificationError:
        raise
    except Exception as e:  # a bug, still a refusal with a reason
        raise VerificationError(model_where, "internal", f"verification failed: {e!r}") from e
    return SignedManifest(manifest, signer, record["digest"], version)


def _check_name(manifest: Manifest, sig_path: str, policy: TrustPolicy) -> None:
    """Name binding (opt-in): the signed statement's subject name is the one the policy names.

    model_signing writes the model directory's name there and ignores it when
    verifying, so without `model_name` a signature made for another model
    verifies too (only a release statement would bind the config name)."""
    if policy.model_name is not None and manifest.subject_name != policy.model_name:
        raise VerificationError(sig_path, "name", f"signed for model {manifest.subject_name!r}, but the policy's "
                                f"model_name is {policy.model_name!r}")


def record_version(state_dir: str, name: str, version: str, digest: str | None = None) -> None:
    """Raise the accepted version of `name` in state_dir to `version` (rollback protection); `digest`
    is recorded with it for a version the operator stated (VerifiedModel.record_digest)."""
    store = VersionStore(state_dir)
    with _state_lock:
        store.record(name, version, digest)


def _check_file_set(tree: Tree, manifest: Manifest, real: str) -> None:
    """Exact set equality: nothing unsigned is handed over, nothing signed is missing."""
    present, signed = set(tree.files), set(manifest.resources)
    for n in sorted(present - signed):
        raise VerificationError(tree.files[n].path, "manifest", "present but not signed")
    for n in sorted(signed - present):
        raise VerificationError(os.path.join(real, n) if n != "." else real, "manifest", "signed but missing")
    if manifest.method == "shards":
        for n, f in tree.files.items():
            want = set(ranges(f.size, manifest.shard_size))
            if set(manifest.resources[n]) != want:
                raise VerificationError(f.path, "manifest", f"the signed shards do not cover the file's {f.size} bytes")


def _check_release(name: str, data: bytes, where: str, policy: TrustPolicy, signer: str | None,
                   manifest: Manifest, now) -> str:
    bundle = parse_bundle(data, where)
    release_signer = verify_bundle(bundle, policy, now)
    if release_signer != signer:
        raise VerificationError(where, "release", f"signed by {release_signer}, but the model by {signer}")
    model, version, digest = parse_release(bundle.payload, where)
    if model != name:
        raise VerificationError(where, "release", f"is for model {model!r}, not {name!r}")
    if digest != manifest.subject_digest:
        raise VerificationError(where, "release", "is bound to other content (its subject digest differs from the model signature's)")
    return version
