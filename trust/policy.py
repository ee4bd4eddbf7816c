"""The trust policy: which models may be loaded, and who may sign them.

Plain values: the daemon reads them from its TOML config (checking every key
and file there, sealbox.daemon.config.policy_from_toml); the publisher's
`sealbox verify` builds one from its flags. The keys are documented in
SECURITY.md ("The trust policy in the daemon config").
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

if TYPE_CHECKING:
    from cryptography import x509

SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
IDENTITY_KINDS = ("email", "uri", "subject")
# The CLI's `verify --certificate-chain` without --identity; never from TOML.
ANY_IDENTITY = "*"
_VERSION_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9}){0,7}$")


_BARE_EMAIL_RE = re.compile(r"^[^@\s:/<>]+@[^@\s:/<>]+$")


def normalize_identity(text: str) -> str:
    """A pinned certificate signer identity: email:ADDR, uri:URI or
    subject:RFC4514-NAME, or a bare e-mail address as operators write it
    ("alice@example.com"), which pins the certificate's e-mail SAN
    ("email:alice@example.com"). Raises ValueError otherwise."""
    if isinstance(text, str):
        kind, sep, value = text.partition(":")
        if kind in IDENTITY_KINDS and sep and value:
            return text
        if _BARE_EMAIL_RE.match(text):
            return f"email:{text}"
    raise ValueError(f"{text!r} must be email:ADDRESS (or a bare e-mail address), uri:URI or subject:RFC4514-NAME")


def parse_version(text: str) -> tuple[int, ...]:
    """Versions are dot-separated decimal numbers ("1.2.10"), compared as tuples
    with missing components as 0, so "1.2" == "1.2.0" < "1.10"."""
    if not isinstance(text, str) or not _VERSION_RE.match(text):
        raise ValueError(f"version {text!r} is not dot-separated decimal numbers such as 1.2.0")
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the key's PEM text: the `publicKey.hint` model_signing writes."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


@dataclass(frozen=True)
class TrustedKey:
    path: str
    key: ec.EllipticCurvePublicKey
    fingerprint: str  # hex SHA-256 of the PEM text

    @classmethod
    def load(cls, path: str) -> "TrustedKey":
        """Raises ValueError naming what is wrong with the file."""
        with open(path, "rb") as f:
            data = f.read()
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise ValueError(f"not a PEM public key ({e})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
            raise ValueError("not an EC P-256, P-384 or P-521 public key")
        return cls(path, key, key_fingerprint(key))


@dataclass(frozen=True)
class TrustedRoots:
    """X.509 trust anchors plus the signer identities allowed to chain to them."""
    path: str
    certs: tuple[x509.Certificate, ...]
    identities: tuple[str, ...]  # "email:a@b", "uri:https://...", "subject:CN=..."

    @classmethod
    def load(cls, path: str, identities: tuple[str, ...]) -> "TrustedRoots":
        with open(path, "rb") as f:
            data = f.read()
        from cryptography import x509  # here: ~40 ms of imports a key-only policy never needs
        try:
            certs = tuple(x509.load_pem_x509_certificates(data))
        except ValueError as e:
            raise ValueError(f"not PEM certificates ({e})") from None
        return cls(path, certs, identities)


@dataclass(frozen=True)
class SigstoreRoot:
    """Keyless (Sigstore) trust: an operator-pinned trusted_root.json (Fulcio
    CAs, Rekor and timestamp keys), checked offline, with pinned identities."""
    path: str
    trusted_root: object  # sigstore.models.TrustedRoot
    identities: tuple[str, ...]  # certificate SAN values (email or URI)
    issuer: str  # the OIDC issuer that must appear in the certificate

    @classmethod
    def load(cls, path: str, identities: tuple[str, ...], issuer: str) -> "SigstoreRoot":
        try:
            from sigstore.models import TrustedRoot  # optional: only for keyless bundles
        except ImportError:
            raise ValueError("keyless verification needs the sigstore package, which is not installed") from None
        try:
            root = TrustedRoot.from_file(path)
        except OSError:
            raise
        except Exception as e:
            raise ValueError(f"not a Sigstore trusted_root.json ({e})") from None
        return cls(path, root, identities, issuer)


@dataclass(frozen=True)
class TrustPolicy:
    # Allowed model sources: real directory paths (the config resolves them;
    # below them nothing is resolved: verifying walks down with O_NOFOLLOW)
    # and https://, oci:// and sftp:// URL prefixes of fetched models
    # (sealbox.transfer.fetch.under compares them by host, port and path segments).
    sources: tuple[str, ...] = ()
    source_urls: tuple[str, ...] = ()
    public_keys: tuple[TrustedKey, ...] = ()
    certificates: tuple[TrustedRoots, ...] = ()
    sigstore: tuple[SigstoreRoot, ...] = ()
    require_signature: bool = True
    # Relative to the model directory, or absolute. Never handed to a worker.
    signature: str = "model.sig"
    release: str = "model.release.sig"
    # Operator-side: names (files or directories) inside the model directory
    # that are neither verified nor ever handed to a worker.
    ignore_paths: tuple[str, ...] = ()
    # Unsigned models only: name -> hex SHA-256, inline or from a manifest file.
    pinned_files: tuple[tuple[str, str], ...] | None = None
    pinned_manifest: str | None = None
    min_version: str | None = None
    allow_downgrade: bool = False
    # Rollback protection without a signed release statement (upstream-signed
    # models): the version the operator states for this model's content, and
    # an optional pin of its manifest digest ("sha256:HEX").
    version: str | None = None
    manifest_digest: str | None = None
    # The model name the signed statement must carry (its in-toto subject
    # name); None: not checked (upstream records the directory's name).
    model_name: str | None = None
    clock_skew_seconds: int = 300
    max_bytes: int = 16 << 30  # the memfd copies live in RAM (tmpfs): keep below memory
    max_files: int = 10_000    # a fetched model signing more files is refused before any is requested
    where: str = "built-in defaults"  # for error messages and the audit log

    def describe(self) -> str:
        """A one-line summary for the audit log (no key material)."""
        if self.require_signature:
            trust = [f"key:sha256:{k.fingerprint}" for k in self.public_keys]
            trust += [f"roots:{r.path}={'|'.join(r.identities)}" for r in self.certificates]
            trust += [f"sigstore:{r.path}={'|'.join(r.identities)}@{r.issuer}" for r in self.sigstore]
            how = "signed by " + ", ".join(trust)
        else:
            how = "pinned digests from " + (self.pinned_manifest or "the config")
        name = f"; model_name={self.model_name}" if self.model_name is not None else ""
        extra = "".join(f"; {k}={v}" for k, v in (("version", self.version), ("manifest_digest", self.manifest_digest),
                                                   ("ignore_paths", ",".join(self.ignore_paths))) if v)
        return f"{self.where}: {how}{name}; min_version={self.min_version}; allow_downgrade={self.allow_downgrade}{extra}"
