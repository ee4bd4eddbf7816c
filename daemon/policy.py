"""The trust policy: which models a daemon may load, and who may sign them.

Loaded once from the TOML config; every key and file it names is checked at
load time, so a broken policy stops the daemon instead of failing open later.
The keys are documented in SECURITY.md ("The trust policy in the daemon config").
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .config import ConfigError

SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
IDENTITY_KINDS = ("email", "uri", "subject")
# The CLI's `verify --certificate-chain` without --identity; never from TOML.
ANY_IDENTITY = "*"
_VERSION_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9}){0,7}$")


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
    # Allowed model sources: real directory paths (compared after resolving
    # symlinks) and https:// URL prefixes (kept for a later transfer feature).
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
    clock_skew_seconds: int = 300
    max_bytes: int = 16 << 30  # the memfd copies live in RAM (tmpfs): keep below memory
    where: str = "built-in defaults"  # for error messages and the audit log

    @classmethod
    def from_toml(cls, table: dict, where: str, defaults: "TrustPolicy | None" = None) -> "TrustPolicy":
        """Builds a policy from a TOML table; keys absent fall back to `defaults`.

        Raises ConfigError("<where>: <key>: <problem>").
        """
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        base = defaults or cls()
        known = {"sources", "public_keys", "certificates", "sigstore", "require_signature", "signature", "release",
                 "ignore_paths", "pinned_files", "pinned_manifest", "min_version", "allow_downgrade",
                 "clock_skew_seconds", "max_bytes"}
        for key in table:
            if key not in known:
                raise ConfigError(f"{where}: {key}: unknown key (known: {', '.join(sorted(known))})")

        def err(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{where}: {key}: {msg}")

        def get(key, typ, what):
            value = table[key]
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise err(key, f"must be {what}")
            return value

        def abspath(key: str, value) -> str:
            if not isinstance(value, str) or not os.path.isabs(value):
                raise err(key, f"{value!r} must be an absolute path")
            return value

        changes: dict = {"where": where}
        if "sources" in table:
            dirs, urls = [], []
            for s in get("sources", list, "a list of absolute directories or https:// URL prefixes"):
                if isinstance(s, str) and s.startswith("https://") and len(s) > len("https://"):
                    urls.append(s)
                elif isinstance(s, str) and os.path.isabs(s):
                    # Resolved once here; model paths are resolved at verify time.
                    dirs.append(os.path.realpath(s))
                else:
                    raise err("sources", f"{s!r} is neither an absolute directory nor an https:// URL prefix")
            changes["sources"], changes["source_urls"] = tuple(dirs), tuple(urls)
        if "public_keys" in table:
            keys = []
            for p in get("public_keys", list, "a list of PEM public key files"):
                p = abspath("public_keys", p)
                try:
                    keys.append(TrustedKey.load(p))
                except (OSError, ValueError) as e:
                    raise err("public_keys", f"{p}: {e}") from None
            changes["public_keys"] = tuple(keys)
        if "certificates" in table:
            roots = []
            for i, entry in enumerate(get("certificates", list, "an array of tables {roots, identities}")):
                k = f"certificates[{i}]"
                if not isinstance(entry, dict) or set(entry) != {"roots", "identities"}:
                    raise err(k, "must be a table with exactly the keys roots and identities")
                path = abspath(k + ".roots", entry["roots"])
                ids = entry["identities"]
                if not isinstance(ids, list) or not ids:
                    raise err(k + ".identities", "must be a non-empty list: a certificate signer is always pinned")
                for ident in ids:
                    kind, sep, value = ident.partition(":") if isinstance(ident, str) else ("", "", "")
                    if kind not in IDENTITY_KINDS or not sep or not value:
                        raise err(k + ".identities", f"{ident!r} must be email:ADDRESS, uri:URI or subject:RFC4514-NAME")
                try:
                    root = TrustedRoots.load(path, tuple(ids))
                except (OSError, ValueError) as e:
                    raise err(k + ".roots", f"{path}: {e}") from None
                roots.append(root)
            changes["certificates"] = tuple(roots)
        if "sigstore" in table:
            roots = []
            for i, entry in enumerate(get("sigstore", list, "an array of tables {trusted_root, identities, issuer}")):
                k = f"sigstore[{i}]"
                if not isinstance(entry, dict) or set(entry) != {"trusted_root", "identities", "issuer"}:
                    raise err(k, "must be a table with exactly the keys trusted_root, identities and issuer")
                path = abspath(k + ".trusted_root", entry["trusted_root"])
                ids, issuer = entry["identities"], entry["issuer"]
                if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
                    raise err(k + ".identities", "must be a non-empty list of e-mail addresses or URIs: a keyless signer is always pinned")
                if not isinstance(issuer, str) or not issuer.startswith("https://"):
                    raise err(k + ".issuer", f"{issuer!r} must be the https:// URL of the OIDC issuer")
                try:
                    roots.append(SigstoreRoot.load(path, tuple(ids), issuer))
                except (OSError, ValueError) as e:
                    raise err(k + ".trusted_root", f"{path}: {e}") from None
            changes["sigstore"] = tuple(roots)
        for key in ("require_signature", "allow_downgrade"):
            if key in table:
                changes[key] = get(key, bool, "true or false")
        for key in ("signature", "release"):
            if key in table:
                value = get(key, str, "a path")
                if not value or (not os.path.isabs(value) and ".." in value.split("/")):
                    raise err(key, f"{value!r} must be a file name inside the model directory or an absolute path")
                changes[key] = value
        if "ignore_paths" in table:
            paths = get("ignore_paths", list, "a list of relative names inside the model directory")
            for p in paths:
                if not isinstance(p, str) or not p or p.startswith("/") or ".." in p.split("/"):
                    raise err("ignore_paths", f"{p!r} must be a relative name inside the model directory")
            changes["ignore_paths"] = tuple(paths)
        if "pinned_files" in table:
            pins = []
            for name, digest in get("pinned_files", dict, "a table of file name = \"sha256:HEX\"").items():
                if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                    raise err("pinned_files", f"{name}: {digest!r} must be sha256: and 64 lowercase hex digits")
                pins.append((name, digest[len("sha256:"):]))
            changes["pinned_files"] = tuple(sorted(pins))
        if "pinned_manifest" in table:
            changes["pinned_manifest"] = abspath("pinned_manifest", table["pinned_manifest"])
        if "min_version" in table:
            value = get("min_version", str, "a version string")
            try:
                parse_version(value)
            except ValueError as e:
                raise err("min_version", str(e)) from None
            changes["min_version"] = value
        if "clock_skew_seconds" in table:
            value = get("clock_skew_seconds", int, "an integer number of seconds")
            if not 0 <= value <= 86400:
                raise err("clock_skew_seconds", "must be between 0 and 86400")
            changes["clock_skew_seconds"] = value
        if "max_bytes" in table:
            value = get("max_bytes", int, "an integer number of bytes")
            if value <= 0:
                raise err("max_bytes", "must be positive")
            changes["max_bytes"] = value

        policy = dataclasses.replace(base, **changes)
        # Whole-policy rules, checked on the merged result.
        if policy.require_signature and not (policy.public_keys or policy.certificates or policy.sigstore):
            raise err("require_signature", "is true but none of public_keys, certificates or sigstore is set")
        if not policy.require_signature:
            if (policy.pinned_files is None) == (policy.pinned_manifest is None):
                raise err("require_signature", "is false: exactly one of pinned_files or pinned_manifest must pin the digests")
        if not (policy.sources or policy.source_urls):
            raise err("sources", "is required: the directories models may be loaded from")
        return policy

    def describe(self) -> str:
        """A one-line summary for the audit log (no key material)."""
        if self.require_signature:
            trust = [f"key:sha256:{k.fingerprint}" for k in self.public_keys]
            trust += [f"roots:{r.path}={'|'.join(r.identities)}" for r in self.certificates]
            trust += [f"sigstore:{r.path}={'|'.join(r.identities)}@{r.issuer}" for r in self.sigstore]
            how = "signed by " + ", ".join(trust)
        else:
            how = "pinned digests from " + (self.pinned_manifest or "the config")
        return f"{self.where}: {how}; min_version={self.min_version}; allow_downgrade={self.allow_downgrade}"
