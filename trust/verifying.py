"""verify_model: every check a model passes before any worker sees it.

Order: the source against the policy (before any file is opened for its
content), storage checks while opening, the signature (or the operator's
pinned digests), the signed file set against the files present, the rollback
check, hashing into sealed memfds, the digests; only then is the version
recorded (or, with record_version=False, by the caller through record_version once the
model actually serves: the daemon records it when the new worker is READY).
One audit event per decision.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._hashing import hash_into_memfds, ranges
from ._oms import Manifest, check_name, is_ignored, parse_bundle, parse_statement, verify_bundle
from ._rollback import VersionStore, check_version, parse_release
from ._storage import Tree, open_tree, read_checked, resolve_symlinks
from .errors import VerificationError
from .policy import TrustPolicy

__all__ = ["AuditSink", "VerificationError", "VerifiedModel", "verify_model", "record_version", "check_source",
           "parse_pin_manifest", "inside"]

_state_lock = threading.Lock()  # one read-check-record of versions.json at a time


class AuditSink(Protocol):
    """Where verify_model reports each decision (the daemon's AuditLog, say): one event per call."""

    def event(self, event: str, /, **fields: Any) -> Any: ...


@dataclass
class VerifiedModel:
    name: str
    source: str                  # the real path that was verified
    files: dict[str, int]        # signed relative POSIX name -> sealed memfd (CLOEXEC), owned here
    sizes: dict[str, int]
    version: str | None
    signer: str | None           # pinned identity or "key:sha256:<fingerprint>"; None when pinned by digest
    digest: str                  # "sha256:<hex>": OMS subject digest, or the same over the pinned digests
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


def check_source(model_dir: str, policy: TrustPolicy) -> str:
    """Returns the real path if it lies under an allowed source directory."""
    real = os.path.realpath(model_dir)
    for prefix in policy.sources:
        if real == prefix or real.startswith(prefix.rstrip("/") + "/"):
            return real
    raise VerificationError(model_dir, "source", f"resolves to {real}, which is not under an allowed source "
                            f"({', '.join(policy.sources) or 'none configured'})")


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


def _pinned_manifest(policy: TrustPolicy, real: str) -> tuple[Manifest, str]:
    if policy.pinned_manifest is not None:
        where = policy.pinned_manifest
        if inside(os.path.realpath(where), real) is not None:
            raise VerificationError(where, "pin", "the pin manifest is inside the model directory it pins")
        pins = parse_pin_manifest(read_checked(where), where)
    else:
        where = f"{policy.where}: pinned_files"
        pins = dict(policy.pinned_files or ())
    names = sorted(pins, key=lambda n: n.split("/"))
    resources = {check_name(n, where): {(0, None): bytes.fromhex(pins[n])} for n in names}
    digest = hashlib.sha256(b"".join(bytes.fromhex(pins[n]) for n in names)).hexdigest()
    return Manifest(os.path.basename(real), digest, "files", "sha256", None, False, (), resources), where


def verify_model(name: str, model_dir: str, policy: TrustPolicy, state_dir: str | None, audit: AuditSink | None,
                 now: datetime.datetime | None = None, record_version: bool = True) -> VerifiedModel:
    """Verifies one model; raises VerificationError naming the file and the check.

    state_dir=None skips the rollback state (the publisher's `verify`). record_version=False checks
    the version against the state but leaves recording it to the caller (the function record_version)."""
    record = {"model": name, "source": model_dir, "policy": policy.describe()}
    tree: Tree | None = None
    hashed = None
    try:
        real = check_source(model_dir, policy)
        record["source"] = real
        base = os.path.dirname(real) if os.path.isfile(real) else real
        sig_path = os.path.join(base, policy.signature)
        release_path = os.path.join(base, policy.release)
        # Our metadata files are never model files, whatever the bundle says.
        exclude = {r for r in (inside(sig_path, real), inside(release_path, real)) if r}

        sig_bytes = read_checked(sig_path) if policy.require_signature else None
        release_bytes = None
        if policy.require_signature and os.path.lexists(release_path):
            release_bytes = read_checked(release_path)
        tree = open_tree(real, exclude)

        signer = None
        if sig_bytes is not None:
            bundle = parse_bundle(sig_bytes, sig_path)
            signer = verify_bundle(bundle, policy, now)
            record["signer"] = signer
            manifest, manifest_where = parse_statement(bundle.payload, sig_path), sig_path
        else:
            manifest, manifest_where = _pinned_manifest(policy, real)
        digest = f"sha256:{manifest.subject_digest}"
        record["digest"] = digest

        # Files under the signed (or the policy's) ignore_paths are not
        # authenticated: they are dropped, never handed over.
        ignored = manifest.ignore_paths + policy.ignore_paths
        for n in [n for n in tree.files if is_ignored(n, ignored)]:
            tree.drop(n)
        for n in [n for n in tree.symlinks if is_ignored(n, ignored)]:
            del tree.symlinks[n]
        resolve_symlinks(tree, manifest.allow_symlinks)
        _check_file_set(tree, manifest, real)

        total = sum(f.size for f in tree.files.values())
        if total > policy.max_bytes:
            raise VerificationError(real, "size", f"{total} bytes, more than the policy's max_bytes {policy.max_bytes}")

        version = None
        if release_bytes is not None:
            version = _check_release(name, release_bytes, release_path, policy, signer, manifest, now)
        record["version"] = version
        store = VersionStore(state_dir) if state_dir is not None else None
        with _state_lock:
            check_version(name, version, release_path, policy, store.get(name) if store else None)

        hashed = hash_into_memfds(list(tree.files.values()), manifest.hash_type, manifest.shard_size)
        for n, h in hashed.items():
            signed = manifest.resources[n]
            got = h.digests if manifest.method == "shards" else {(0, None): h.digests[(0, h.size)]}
            for rng, want in signed.items():
                if got[rng] != want:
                    where = tree.files[n].path + (f" bytes {rng[0]}-{rng[1]}" if manifest.method == "shards" else "")
                    raise VerificationError(where, "digest", f"{manifest.hash_type} digest differs from the one in {manifest_where}")

        if record_version and store is not None and version is not None:
            with _state_lock:
                store.record(name, version)
        label = (lambda n: os.path.basename(real)) if tree.single_file else (lambda n: n)
        model = VerifiedModel(name, real, {label(n): h.memfd for n, h in hashed.items()},
                              {label(n): h.size for n, h in hashed.items()}, version, signer, digest)
        hashed = None  # owned by `model` now
        if audit:
            audit.event("model.verify", **record, verdict="accepted", reason="all checks passed", files=len(model.files))
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
        # A bug, not a verdict on the model: still audited, still a refusal.
        if audit:
            audit.event("model.verify", **record, verdict="refused", reason=f"internal error: {e!r}", check="internal")
        raise
    finally:
        if tree is not None:
            tree.close()
        if hashed:
            for h in hashed.values():
                os.close(h.memfd)


def record_version(state_dir: str, name: str, version: str) -> None:
    """Raise the accepted version of `name` in state_dir to `version` (rollback protection)."""
    store = VersionStore(state_dir)
    with _state_lock:
        store.record(name, version)


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
