"""The OpenSSF model-signing (OMS) format: Sigstore bundle v0.3 + DSSE + in-toto.

Read and written here from the format, as model_signing 1.x reads and writes it:

- The signature file is a Sigstore bundle JSON (mediaType
  application/vnd.dev.sigstore.bundle.v0.3+json) holding verificationMaterial
  and a dsseEnvelope: payloadType application/vnd.in-toto+json, payload the
  base64 of the statement, one signature (base64 DER ECDSA, keyid empty).
- The signature covers the DSSE pre-authentication encoding of the decoded
  payload bytes (`pae`), never a re-serialization: key order inside the
  predicate is not stable. EC keys only, with SHA-256/384/512 for P-256/384/521.
- Key bundles carry publicKey.hint, the hex SHA-256 of the signer's PEM text
  (a hint, never a trust decision); certificate bundles carry
  x509CertificateChain (base64 DER, leaf first, root not included); keyless
  bundles carry a Fulcio certificate and transparency-log entries.
- The statement (predicateType https://model_signing/signature/v1.0) has one
  subject, whose digest is SHA-256 over the raw resource digests in the order
  listed; writers list resources by path compared component-wise
  (a/b < a-b < a.txt). Method `files`: each resource is a relative POSIX path
  ("." for a single-file model). Method `shards`: PATH:START:END (end
  exclusive) with algorithm HASH-sharded-SIZE; an empty file has no shard;
  shard_size is written as a JSON float such as 1000000000.0.
- serialization.ignore_paths: model_signing 1.1 records the paths it skipped
  (.git, .gitattributes, .github, .gitignore, the signature, what --ignore_paths
  named); 1.0.x records none, so a file it was told to skip is unsigned and
  only an operator's ignore paths at verification drop it (upstream's own
  v1.0.1 test vectors carry such a file, `ignore-me`).
- The pre-1.0 format (model_signing 0.2) uses the same bundle shape with
  predicateType https://model_signing/Digests/v0.1, one subject per file and a
  non-standard DSSE encoding: recognised by that predicate, before any
  signature check, and refused (`refuse_legacy_format`).
- Bounds (sealbox's, not the format's): a bundle nests about 6 deep; every
  untrusted JSON document is parsed by `strict_json`, at most MAX_JSON_BYTES
  and MAX_JSON_DEPTH deep.

All cryptography goes through the `cryptography` package, except for keyless
bundles: sigstore-python verifies those, offline, against an operator-pinned
trusted_root.json, with the signer identity and OIDC issuer pinned. Stricter
than model_signing 1.1.1: a certificate-chain leaf must be valid *now*, the
signer identity is always pinned, resource names are validated, duplicate
JSON keys are refused, and so are the legacy pre-1.0 format and key or
certificate bundles carrying transparency-log or timestamp entries.
SECURITY.md ("Signatures: the OpenSSF model-signing format") says what is
accepted and refused, and why.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

if TYPE_CHECKING:
    from cryptography import x509
# cryptography.x509 is imported where certificates are handled: ~40 ms of start-up (a third of
# `sealbox verify`'s imports) that key-signed models never need.

from ._hashing import ALGORITHMS
from .errors import VerificationError
from .policy import ANY_IDENTITY, SUPPORTED_CURVES, TrustPolicy, key_fingerprint

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
LEGACY_PREDICATE_TYPE = "https://model_signing/Digests/v0.1"
# What model_signing ignores by default, plus sealbox's own metadata files.
DEFAULT_IGNORE = (".git", ".gitattributes", ".github", ".gitignore")


def _b64(value, where: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise VerificationError(where, "bundle", f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationError(where, "bundle", f"{what} is not valid base64") from None


# Bounds on every untrusted JSON document the supervisor parses (bundles,
# statements, release statements, versions.json): a signature is a few KiB to
# a few MiB (one resource line per model file) and nests about 6 deep.
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 64
# A string (escapes included) or one bracket: the depth scan skips strings whole.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth_exceeds(text: str, limit: int) -> bool:
    """True if brackets outside strings nest deeper than `limit`: an
    iterative scan, so checking costs no recursion whatever the input."""
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def strict_json(data: bytes, where: str, check: str):
    """The one parser of untrusted JSON in sealbox.trust: bounded in size
    (MAX_JSON_BYTES) and nesting depth (MAX_JSON_DEPTH) before json.loads
    sees it, UTF-8 only, duplicate keys refused (two readers must never
    disagree). Every failure is a VerificationError(where, check, ...)."""
    def pairs(items):
        obj = {}
        for k, v in items:
            if k in obj:
                raise ValueError(f"duplicate key {k!r}")
            obj[k] = v
        return obj
    if len(data) > MAX_JSON_BYTES:
        raise VerificationError(where, check, f"not valid JSON ({len(data)} bytes, more than the {MAX_JSON_BYTES} allowed)")
    try:
        text = data.decode("utf-8")  # json.loads(bytes) would guess UTF-16/32 too
    except UnicodeDecodeError:
        raise VerificationError(where, check, "not valid JSON (not UTF-8 text)") from None
    if json_depth_exceeds(text, MAX_JSON_DEPTH):
        raise VerificationError(where, check, f"not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)")
    try:
        return json.loads(text, object_pairs_hook=pairs)
    except RecursionError:  # not reached after the scan above; never a traceback if it were
        raise VerificationError(where, check, f"not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:
        raise VerificationError(where, check, f"not valid JSON ({e})") from None


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _hash_for(key: ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[key.curve.key_size]


@dataclass(frozen=True)
class Bundle:
    where: str
    payload_type: str
    payload: bytes          # exactly the decoded bytes the signature covers
    signature: bytes        # DER ECDSA
    key_hint: str | None    # key method: hex SHA-256 of the signer's PEM
    chain: tuple[x509.Certificate, ...]  # certificate method: leaf first
    keyless: bytes | None = None  # keyless: the whole bundle, for sigstore's verifier


def parse_bundle(data: bytes, where: str) -> Bundle:
    doc = strict_json(data, where, "bundle")
    if not isinstance(doc, dict):
        raise VerificationError(where, "bundle", "not a JSON object")
    if doc.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise VerificationError(where, "bundle", f"mediaType {doc.get('mediaType')!r} is not {BUNDLE_MEDIA_TYPE}")
    material, env = doc.get("verificationMaterial"), doc.get("dsseEnvelope")
    if not isinstance(material, dict) or not isinstance(env, dict):
        raise VerificationError(where, "bundle", "verificationMaterial or dsseEnvelope missing")
    key_hint, chain, keyless = None, (), None
    if "certificate" in material:
        # Keyless: a Fulcio certificate plus transparency-log proof, all
        # checked by sigstore-python against the operator's trusted root.
        keyless = data
    elif material.get("tlogEntries") or material.get("timestampVerificationData"):
        raise VerificationError(where, "bundle", "transparency-log or timestamp entries with a key or certificate chain: not supported")
    elif "publicKey" in material and "x509CertificateChain" not in material:
        pk = material["publicKey"]
        if not isinstance(pk, dict):
            raise VerificationError(where, "bundle", "publicKey is not an object")
        if isinstance(pk.get("hint"), str) and pk["hint"]:
            key_hint = pk["hint"].lower()
        elif "rawBytes" in pk:
            # model_signing < 1.0 embedded the PEM itself: only a hint to us.
            key_hint = hashlib.sha256(_b64(pk["rawBytes"], where, "publicKey.rawBytes")).hexdigest()
    elif "x509CertificateChain" in material and "publicKey" not in material:
        certs = material["x509CertificateChain"].get("certificates") if isinstance(material["x509CertificateChain"], dict) else None
        if not isinstance(certs, list) or not certs:
            raise VerificationError(where, "bundle", "x509CertificateChain has no certificates")
        from cryptography import x509
        parsed = []
        for i, c in enumerate(certs):
            der = _b64(c.get("rawBytes") if isinstance(c, dict) else None, where, f"certificate {i}")
            try:
                parsed.append(x509.load_der_x509_certificate(der))
            except ValueError:
                raise VerificationError(where, "bundle", f"certificate {i} is not DER X.509") from None
        chain = tuple(parsed)
    else:
        raise VerificationError(where, "bundle", "verificationMaterial must hold exactly one of publicKey or x509CertificateChain")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        raise VerificationError(where, "bundle", "the DSSE envelope must carry exactly one signature")
    payload_type = env.get("payloadType")
    if payload_type != INTOTO_PAYLOAD_TYPE:
        raise VerificationError(where, "bundle", f"payloadType {payload_type!r} is not {INTOTO_PAYLOAD_TYPE}")
    return Bundle(where, payload_type, _b64(env.get("payload"), where, "payload"),
                  _b64(sigs[0].get("sig"), where, "signature"), key_hint, chain, keyless)


def verify_bundle(bundle: Bundle, policy: TrustPolicy, now: datetime.datetime | None = None) -> str:
    """Checks the DSSE signature against the policy; returns the signer identity
    ("key:sha256:<fingerprint>", the pinned certificate identity such as
    "email:a@b", or "sigstore:<identity> (<issuer>)")."""
    if bundle.keyless is not None:
        return _verify_keyless(bundle, policy)
    message = pae(bundle.payload_type, bundle.payload)
    if bundle.chain:
        return _verify_chain(bundle, policy, message, now or datetime.datetime.now(datetime.timezone.utc))
    if not policy.public_keys:
        raise VerificationError(bundle.where, "signature", "signed with a key, but the policy trusts no public keys")
    candidates = [k for k in policy.public_keys if bundle.key_hint in (None, k.fingerprint)]
    if not candidates:
        raise VerificationError(bundle.where, "signature", f"signed by key sha256:{bundle.key_hint}, which the policy does not trust")
    for k in candidates:
        try:
            k.key.verify(bundle.signature, message, ec.ECDSA(_hash_for(k.key)))
            return f"key:sha256:{k.fingerprint}"
        except InvalidSignature:
            continue
    raise VerificationError(bundle.where, "signature", "the DSSE signature does not verify with "
                            + ", ".join(f"{k.path} (sha256:{k.fingerprint})" for k in candidates))


def cert_identities(cert: x509.Certificate) -> list[str]:
    from cryptography import x509
    ids = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ids += [f"email:{v}" for v in san.get_values_for_type(x509.RFC822Name)]
        ids += [f"uri:{v}" for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        pass
    ids.append(f"subject:{cert.subject.rfc4514_string()}")
    return ids


def _verify_chain(bundle: Bundle, policy: TrustPolicy, message: bytes, now: datetime.datetime) -> str:
    from cryptography import x509
    from cryptography.x509 import verification as xv
    from cryptography.x509.oid import ExtendedKeyUsageOID
    where, leaf, intermediates = bundle.where, bundle.chain[0], list(bundle.chain[1:])
    if not policy.certificates:
        raise VerificationError(where, "certificate", "signed with a certificate, but the policy trusts no certificate roots")
    skew = datetime.timedelta(seconds=policy.clock_skew_seconds)
    # Upstream checks validity at the leaf's notBefore; we check it now.
    if now > leaf.not_valid_after_utc + skew:
        raise VerificationError(where, "certificate", f"the signing certificate expired at {leaf.not_valid_after_utc.isoformat()} "
                                f"(now {now.replace(microsecond=0).isoformat()}, clock skew allowed {policy.clock_skew_seconds}s)")
    if now < leaf.not_valid_before_utc - skew:
        raise VerificationError(where, "certificate", f"the signing certificate is not valid before {leaf.not_valid_before_utc.isoformat()}")
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
        raise VerificationError(where, "certificate", "the signing certificate's key is not EC P-256, P-384 or P-521")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.digital_signature:
            raise VerificationError(where, "certificate", "the signing certificate's keyUsage lacks digitalSignature")
    except x509.ExtensionNotFound:
        raise VerificationError(where, "certificate", "the signing certificate has no keyUsage extension") from None
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
            raise VerificationError(where, "certificate", "the signing certificate's extendedKeyUsage lacks codeSigning")
    except x509.ExtensionNotFound:
        pass
    # Within the skew window, build the chain at the nearest valid instant.
    at = min(max(now, leaf.not_valid_before_utc), leaf.not_valid_after_utc)
    identities = cert_identities(leaf)
    reasons = []
    for roots in policy.certificates:
        verifier = (xv.PolicyBuilder().store(xv.Store(list(roots.certs))).time(at)
                    # The leaf's own extensions are checked above: signing
                    # certificates are not web PKI client certificates.
                    .extension_policies(ca_policy=xv.ExtensionPolicy.webpki_defaults_ca(),
                                        ee_policy=xv.ExtensionPolicy.permit_all())
                    .build_client_verifier())
        try:
            verifier.verify(leaf, intermediates)
        except xv.VerificationError as e:
            reasons.append(f"{roots.path}: {e}")
            continue
        pinned = [i for i in identities if i in roots.identities or ANY_IDENTITY in roots.identities]
        if not pinned:
            raise VerificationError(where, "identity", f"signer {', '.join(identities)} is not among the identities pinned "
                                    f"for {roots.path} ({', '.join(roots.identities)})")
        try:
            key.verify(bundle.signature, message, ec.ECDSA(_hash_for(key)))
        except InvalidSignature:
            raise VerificationError(where, "signature", f"the DSSE signature does not verify with the certificate of {pinned[0]}") from None
        return pinned[0]
    raise VerificationError(where, "certificate", "the certificate chain does not lead to a trusted root: " + "; ".join(reasons))


def _verify_keyless(bundle: Bundle, policy: TrustPolicy) -> str:
    where = bundle.where
    if not policy.sigstore:
        raise VerificationError(where, "bundle", "a keyless Sigstore bundle, but the policy pins no sigstore trusted root; "
                                                 "sign with a key or a certificate chain, or configure sigstore")
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import Bundle as SigstoreBundle
    from sigstore.verify import Verifier, policy as sp
    try:
        parsed = SigstoreBundle.from_json(bundle.keyless)
    except Exception as e:
        raise VerificationError(where, "bundle", f"not a valid Sigstore bundle ({e})") from None
    reasons = []
    for root in policy.sigstore:
        verifier = Verifier(trusted_root=root.trusted_root)
        for ident in root.identities:  # one at a time: sigstore's AnyOf hides the reason
            try:
                payload_type, payload = verifier.verify_dsse(parsed, sp.Identity(identity=ident, issuer=root.issuer))
            except SigstoreError as e:
                reasons.append(f"{root.path}: {e}")
                continue
            # Everything after this point reads bundle.payload: it must be what sigstore verified.
            if (payload_type, payload) != (bundle.payload_type, bundle.payload):
                raise VerificationError(where, "bundle", "the payload sigstore verified differs from the envelope's")
            return f"sigstore:{ident} ({root.issuer})"
    raise VerificationError(where, "signature", "keyless verification failed: " + "; ".join(reasons))


@dataclass(frozen=True)
class Manifest:
    """The signed statement: which content the model consists of."""
    subject_name: str
    subject_digest: str  # hex SHA-256 over the raw resource digests, in order
    method: str          # "files" or "shards"
    hash_type: str
    shard_size: int | None
    allow_symlinks: bool
    ignore_paths: tuple[str, ...]
    # path -> {(start, end): raw digest}; files mode: {(0, None): digest}
    resources: dict[str, dict[tuple[int, int | None], bytes]]


def check_name(name, where: str) -> str:
    """A resource name must be a plain relative POSIX path inside the model."""
    if not isinstance(name, str) or not name:
        raise VerificationError(where, "manifest", f"resource name {name!r} is not a non-empty string")
    if name == ".":
        return name  # a single-file model
    parts = name.split("/")
    if name.startswith("/") or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        raise VerificationError(where, "manifest", f"resource name {name!r} is not a plain relative path inside the model")
    return name


LEGACY_REFUSAL = (f"the legacy pre-1.0 model_signing format (predicate {LEGACY_PREDICATE_TYPE}): "
                  "not supported; re-sign with model_signing >= 1.0")


def refuse_legacy_format(bundle: Bundle) -> None:
    """Recognises the pre-1.0 format by its predicate, before any signature
    check: its non-standard DSSE encoding would only fail as 'does not verify'.
    Reads the still unverified payload, through the bounded parser only."""
    st = strict_json(bundle.payload, bundle.where, "statement")
    if isinstance(st, dict) and st.get("predicateType") == LEGACY_PREDICATE_TYPE:
        raise VerificationError(bundle.where, "format", LEGACY_REFUSAL)


def parse_statement(payload: bytes, where: str) -> Manifest:
    st = strict_json(payload, where, "statement")
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE:
        raise VerificationError(where, "statement", f"not an in-toto {STATEMENT_TYPE} statement")
    if st.get("predicateType") == LEGACY_PREDICATE_TYPE:
        raise VerificationError(where, "format", LEGACY_REFUSAL)
    if st.get("predicateType") != PREDICATE_TYPE:
        raise VerificationError(where, "statement", f"predicateType {st.get('predicateType')!r} is not {PREDICATE_TYPE}")
    subjects = st.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise VerificationError(where, "statement", "must have exactly one subject")
    subject_digest = (subjects[0].get("digest") or {}).get("sha256")
    pred = st.get("predicate")
    if not isinstance(pred, dict) or not isinstance(pred.get("serialization"), dict) or not isinstance(pred.get("resources"), list):
        raise VerificationError(where, "statement", "predicate lacks serialization or resources")
    ser = pred["serialization"]
    method, hash_type = ser.get("method"), ser.get("hash_type")
    if method not in ("files", "shards"):
        raise VerificationError(where, "statement", f"serialization method {method!r} is not files or shards")
    if hash_type not in ALGORITHMS or (method == "shards" and hash_type == "blake3"):
        raise VerificationError(where, "statement", f"hash_type {hash_type!r} is not supported for {method}")
    allow_symlinks = ser.get("allow_symlinks", False)
    if not isinstance(allow_symlinks, bool):
        raise VerificationError(where, "statement", "allow_symlinks is not a boolean")
    shard_size = None
    if method == "shards":
        raw = ser.get("shard_size")
        # model_signing writes it as a JSON float such as 1000000000.0.
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw != int(raw) or int(raw) <= 0:
            raise VerificationError(where, "statement", f"shard_size {raw!r} is not a positive integer")
        shard_size = int(raw)
    ignore = ser.get("ignore_paths", [])
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise VerificationError(where, "statement", "ignore_paths is not a list of strings")

    expected_alg = hash_type if method == "files" else f"{hash_type}-sharded-{shard_size}"
    resources: dict[str, dict] = {}
    concat = hashlib.sha256()
    seen = set()
    for r in pred["resources"]:
        if not isinstance(r, dict):
            raise VerificationError(where, "manifest", "a resource is not an object")
        name, alg, digest_hex = r.get("name"), r.get("algorithm"), r.get("digest")
        if alg != expected_alg:
            raise VerificationError(where, "manifest", f"resource {name!r} uses algorithm {alg!r}, not {expected_alg!r}")
        try:
            digest = bytes.fromhex(digest_hex)
        except (TypeError, ValueError):
            raise VerificationError(where, "manifest", f"resource {name!r} has a digest that is not hex") from None
        if name in seen:
            raise VerificationError(where, "manifest", f"duplicate resource name {name!r}")
        seen.add(name)
        concat.update(digest)
        if method == "files":
            resources[check_name(name, where)] = {(0, None): digest}
        else:
            path, start, end = _shard_name(name, where)
            resources.setdefault(check_name(path, where), {})[(start, end)] = digest
    if subject_digest != concat.hexdigest():
        raise VerificationError(where, "manifest", "the subject digest does not match the listed resources")
    return Manifest(str(subjects[0].get("name", "")), subject_digest, method, hash_type, shard_size,
                    allow_symlinks, tuple(ignore), resources)


def _shard_name(name, where: str) -> tuple[str, int, int]:
    parts = name.rsplit(":", 2) if isinstance(name, str) else []
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[1]) >= int(parts[2]):
        raise VerificationError(where, "manifest", f"shard name {name!r} is not PATH:START:END")
    return parts[0], int(parts[1]), int(parts[2])


def is_ignored(name: str, ignore_paths: tuple[str, ...]) -> bool:
    """Signed ignore_paths are relative to the model root; a directory covers its content."""
    for p in ignore_paths:
        p = posixpath.normpath(p)
        if p and not p.startswith(("/", "../")) and p != "..":
            if name == p or name.startswith(p + "/"):
                return True
    return False


# ---- signing (the publisher side) -------------------------------------------------


def statement_payload(model_name: str, digests: dict[str, bytes], hash_type: str, ignore_paths: list[str]) -> bytes:
    """The in-toto statement model_signing 1.x writes for the files method."""
    names = sorted(digests, key=lambda n: n.split("/"))  # component-wise, like model_signing
    resources = [{"name": n, "algorithm": hash_type, "digest": digests[n].hex()} for n in names]
    subject = hashlib.sha256(b"".join(digests[n] for n in names)).hexdigest()
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": subject}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": hash_type, "allow_symlinks": False,
                              "ignore_paths": sorted(ignore_paths)},
            "resources": resources,
        },
    }
    return json.dumps(statement, indent=2).encode()


def load_private_key(path: str) -> ec.EllipticCurvePrivateKey:
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SUPPORTED_CURVES:
        raise ValueError(f"{path}: not an EC P-256, P-384 or P-521 private key")
    return key


def sign_payload(payload: bytes, private_key: ec.EllipticCurvePrivateKey,
                 chain: list[x509.Certificate] | None = None) -> bytes:
    """A Sigstore bundle v0.3 JSON over a DSSE envelope of `payload`.
    chain=None: key method (publicKey.hint); else leaf-first certificate chain."""
    sig = private_key.sign(pae(INTOTO_PAYLOAD_TYPE, payload), ec.ECDSA(_hash_for(private_key.public_key())))
    if chain is None:
        material = {"publicKey": {"hint": key_fingerprint(private_key.public_key())}, "tlogEntries": []}
    else:
        if chain[0].public_key() != private_key.public_key():
            raise ValueError("the signing certificate does not match the private key")
        material = {"x509CertificateChain": {"certificates": [
            {"rawBytes": base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()} for c in chain]},
            "tlogEntries": []}
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": material,
        "dsseEnvelope": {"payload": base64.b64encode(payload).decode(), "payloadType": INTOTO_PAYLOAD_TYPE,
                         "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}]},
    }
    return json.dumps(bundle).encode()
