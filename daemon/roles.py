"""Who may call what: roles by protocol group, and the caller's identity as the transport proved it.

Roles follow Triton's restricted-protocol categories (health, metadata, inference,
model-repository, statistics).  Every method is in exactly one role; a method that is not
in METHOD_ROLES is refused (default deny), so a new RPC added to the proto cannot become
callable by accident.

Identity.  grpcio gives no peer credentials (SO_PEERCRED) for Unix sockets, and
`context.peer()` is the literal string "unix:" for EVERY Unix socket of a server (measured,
grpcio 1.85), so the listener itself is the identity: one grpc.aio.Server per listener
(see listeners.py), and the interceptor of that server knows its listener.  On TCP with
mutual TLS the certificate adds identities, read from `context.auth_context()`.

auth_context() keys measured with grpcio 1.85.3 (values are lists of bytes):
  every transport   transport_security_type ([b'insecure'] or [b'ssl']), security_level
                    ([b'TSI_SECURITY_NONE'] / [b'TSI_PRIVACY_AND_INTEGRITY'])
  TLS + client cert x509_subject ([b'CN=alice,O=sealbox-test'], RFC 2253 order),
                    x509_common_name, x509_pem_cert,
                    x509_subject_alternative_name (ALL SANs, untyped, in cert order),
                    peer_email, peer_uri, peer_dns (typed SANs), peer_spiffe_id (if a URI SAN
                    is spiffe://), ssl_session_reused, ssl_tls_version,
                    ssl_negotiated_key_exchange_group
  A cert without SANs has only x509_subject / x509_common_name / x509_pem_cert.
These keys are present only after the handshake VERIFIED the chain against the server's
root_certificates with require_client_auth=True; with require_client_auth=False grpcio does
not request a client certificate at all, so never derive roles from a listener without it.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

HEALTH = "health"
METADATA = "metadata"
INFERENCE = "inference"
MODEL_REPOSITORY = "model-repository"
STATISTICS = "statistics"
ALL_ROLES = frozenset({HEALTH, METADATA, INFERENCE, MODEL_REPOSITORY, STATISTICS})
# Roles that never wait behind inference (admission.py gives them their own lane).
CONTROL_ROLES = frozenset({HEALTH, METADATA, MODEL_REPOSITORY, STATISTICS})

OIP = "/inference.GRPCInferenceService/"
METHOD_ROLES: dict[str, str] = {
    # health (Triton "health")
    OIP + "ServerLive": HEALTH,
    OIP + "ServerReady": HEALTH,
    OIP + "ModelReady": HEALTH,
    "/grpc.health.v1.Health/Check": HEALTH,
    "/grpc.health.v1.Health/Watch": HEALTH,          # a server stream: capped by the control lane
    # metadata (Triton "metadata"; ModelConfig is Triton's "model-config", read-only -> metadata)
    OIP + "ServerMetadata": METADATA,
    OIP + "ModelMetadata": METADATA,
    OIP + "ModelConfig": METADATA,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": METADATA,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": METADATA,
    # inference (Triton "inference"; shared memory is Triton's "shared-memory" category:
    # sealbox answers UNIMPLEMENTED to it, and it belongs to whoever may infer)
    OIP + "ModelInfer": INFERENCE,
    OIP + "ModelStreamInfer": INFERENCE,
    OIP + "SystemSharedMemoryStatus": INFERENCE,
    OIP + "SystemSharedMemoryRegister": INFERENCE,
    OIP + "SystemSharedMemoryUnregister": INFERENCE,
    OIP + "CudaSharedMemoryStatus": INFERENCE,
    OIP + "CudaSharedMemoryRegister": INFERENCE,
    OIP + "CudaSharedMemoryUnregister": INFERENCE,
    # model-repository (Triton "model-repository")
    OIP + "RepositoryIndex": MODEL_REPOSITORY,
    OIP + "RepositoryModelLoad": MODEL_REPOSITORY,
    OIP + "RepositoryModelUnload": MODEL_REPOSITORY,
    # statistics (Triton "statistics").  Triton's TraceSetting and
    # LogSettings are admin operations: if they are ever added, put them in model-repository.
    OIP + "ModelStatistics": STATISTICS,
}


# Long-lived control streams: counted with the inference streams (admission `streams`), not in the
# control lane, so that idle watchers cannot take every control slot from ServerLive.
CONTROL_STREAMS = frozenset({
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})


def role_for(method: str) -> str | None:
    """The role a full method name ("/pkg.Service/Method") needs; None = unknown = refuse."""
    return METHOD_ROLES.get(method)


@dataclasses.dataclass(frozen=True)
class Caller:
    """The caller as the transport proved it.  Goes into every audit event of the call."""
    listener: str                       # configured listener name, e.g. "admin", "public", "tcp-mtls"
    transport: str                      # "unix" | "tcp" | "tls" | "mtls"
    peer: str                           # context.peer(): "unix:" or "ipv4:127.0.0.1:51234" / "ipv6:[::1]:…"
    subject: str | None = None          # x509_subject, verified (mTLS only)
    sans: tuple[str, ...] = ()          # typed: "email:…", "uri:…", "dns:…"; plus "cn:…" for the CN
    roles: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """Per-caller accounting key (admission caps).  On Unix and plain TCP the listener is all we
        know (all loopback clients share it); on mTLS it is the certificate subject."""
        return f"{self.listener}|{self.subject or '-'}"

    def audit_fields(self) -> dict:
        d = {"listener": self.listener, "transport": self.transport}
        if self.transport != "unix":
            d["peer"] = self.peer           # never a path or pid: Unix peers are just "unix:"
        if self.subject:
            d["cert_subject"] = self.subject
            d["cert_sans"] = list(self.sans)
        return d


def _first(ac: Mapping[str, list[bytes]], key: str) -> str | None:
    v = ac.get(key)
    return v[0].decode("utf-8", "replace") if v else None


def caller_from_context(context, listener: str, transport: str, base_roles: frozenset[str],
                        identity_roles: Mapping[str, frozenset[str]] | None = None) -> Caller:
    """Build the Caller for one RPC on a grpc.aio ServicerContext.

    base_roles: what anyone who can reach this listener may do.
    identity_roles: mTLS listeners only: {"uri:spiffe://x/admin": {...}, "cn:bob": {...},
    "email:a@b": {...}, "dns:h.example": {...}, "subject:CN=…,O=…": {...}} -> extra roles.
    """
    peer = context.peer() or "?"
    if transport != "mtls":
        return Caller(listener, transport, peer, roles=base_roles)
    ac = context.auth_context()
    subject = _first(ac, "x509_subject")
    if subject is None:  # cannot happen with require_client_auth=True; refuse everything but base
        return Caller(listener, transport, peer, roles=base_roles)
    sans: list[str] = []
    cn = _first(ac, "x509_common_name")
    if cn:
        sans.append("cn:" + cn)
    for key, prefix in (("peer_email", "email:"), ("peer_uri", "uri:"), ("peer_dns", "dns:")):
        sans += [prefix + v.decode("utf-8", "replace") for v in ac.get(key, ())]
    roles = set(base_roles)
    for ident in ["subject:" + subject, *sans]:
        roles |= (identity_roles or {}).get(ident, frozenset())
    return Caller(listener, transport, peer, subject=subject, sans=tuple(sans), roles=frozenset(roles))
