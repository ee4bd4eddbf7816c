"""sealbox.trust: is this model what its publisher signed, and do we trust the publisher?

Everything a model passes before any worker sees a byte of it, and the
publisher's side of the same format. Used by the daemon (sealbox.daemon), the
publisher CLI and the demo (sealbox.client) and the benchmarks; it imports
none of them. SECURITY.md ("Model verification") describes the checks.

The public face is this module and the modules without a leading underscore:

    from . import TrustPolicy, VerificationError, verify_model
    with verify_model(name, model_dir, policy, state_dir, audit) as model:
        model.files  # signed name -> sealed memfd of exactly the bytes verified

| module | what it holds |
|---|---|
| `errors.py` | `VerificationError(file, check, detail)`: a model refused, the message `FILE: CHECK: what is wrong` |
| `policy.py` | the trust policy as plain values: `TrustPolicy`, `TrustedKey`, `TrustedRoots`, `SigstoreRoot`; `parse_version`, `ANY_IDENTITY` (the daemon reads them from TOML in sealbox.daemon.config) |
| `verifying.py` | `verify_model` -> `VerifiedModel` (one sealed memfd per signed file; `seal=False`: only hashed, for `sealbox verify`), the check order, the `AuditSink` it reports to, the source check (which root a model path lies under), operator pin manifests |
| `signing.py` | the publisher's side (`sealbox hash`, `sealbox sign`): model digests, the OMS statement, release statements, signed bundles |
| `_storage.py` | storage checks: the walk from a source root down to the model, then every entry of the model, each opened `O_NOFOLLOW` relative to its parent's fd and checked on that fd (owner, mode, kind, hard links, symlinks) |
| `_hashing.py` | hashing each file in one pass of 1 MiB reads while copying it into a sealed memfd (or only hashing), on a thread pool (sha256, blake2b, blake3; files or shards); no buffer outlives a call |
| `_oms.py` | the OpenSSF model-signing format: Sigstore bundle v0.3, DSSE, in-toto statement; parsing, signature and certificate-chain checks, keyless via sigstore; writing bundles; `strict_json`, the one bounded parser of untrusted JSON |
| `_rollback.py` | signed release statements, operator-stated versions, and the highest version accepted per model (`versions.json`) |
"""
from . import signing
from .errors import VerificationError
from .policy import TrustPolicy
from .verifying import AuditSink, VerifiedModel, record_version, verify_model

__all__ = ["AuditSink", "TrustPolicy", "VerificationError", "VerifiedModel", "record_version", "signing", "verify_model"]
