"""Provenance to the caller: which verified model answered, stamped by the supervisor.

Every ModelInferResponse (and ModelStreamInfer's), every ModelMetadataResponse and ModelConfig
carry, in their `parameters`, the values the trust library accepted when it verified the model the
answering worker was started from:

| parameter | value |
|---|---|
| sealbox_manifest_digest | the manifest digest, "sha256:<hex>" (the OMS subject digest; `sealbox verify` prints it) |
| sealbox_version | the signed release version ("" without a release statement) |
| sealbox_signer | the accepted signer identity, e.g. "key:sha256:<fingerprint>" ("" when pinned by digest) |

The audit log's `model_load` event carries the same three values (manifest_digest, version, signer).

Never trusted from the worker: a compromised worker must not be able to forge them. The
supervisor appends its entries AFTER the worker's response bytes, and protobuf keeps the LAST
entry of a map key, so the supervisor's values win over any the worker wrote; before appending,
proto.wire.check_complete makes sure the worker's bytes end on a field boundary (an open length,
varint or group would otherwise swallow the stamp). A response that fails the check is refused
(INTERNAL, "model 'x' failed"). The values are bound to the worker object, made once when it is
started, so an answer is stamped with the provenance of the worker that gave it, even while
another version takes over.
"""
from __future__ import annotations

from typing import NamedTuple

from ..proto import wire

DIGEST, VERSION, SIGNER = "sealbox_manifest_digest", "sealbox_version", "sealbox_signer"


class Provenance(NamedTuple):
    digest: str
    version: str
    signer: str

    @classmethod
    def of(cls, verified) -> "Provenance":
        """From a sealbox.trust VerifiedModel."""
        return cls(verified.digest or "", verified.version or "", verified.signer or "")

    def parameters(self) -> dict[str, str]:
        return {DIGEST: self.digest, VERSION: self.version, SIGNER: self.signer}

    def audit_fields(self) -> dict[str, str]:
        return {"manifest_digest": self.digest, "version": self.version, "signer": self.signer}

    def stamp(self) -> bytes:
        """ModelInferResponse.parameters entries, to append to a worker's (complete) response."""
        return wire.string_parameters(wire.INFER_RESPONSE_PARAMETERS, self.parameters())
