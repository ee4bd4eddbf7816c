"""TCP with mutual TLS: client certificates checked against the configured CA, identities mapped to roles.

A certificate from another CA, or none, fails in the TLS handshake: the daemon never sees an RPC
(grpcio logs the handshake failure; nothing reaches Python to audit). A verified identity
without the model-repository role gets PERMISSION_DENIED, audited with its certificate subject.
"""
from __future__ import annotations

import socket

import grpc
import numpy as np
import pytest

from tests.support.frontdoor import make_pki


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mtls_daemon(tmp_path, daemon_factory, demo_model, keys):
    pki = make_pki(tmp_path / "pki")
    port = _free_port()
    listener = f'''
[[server.listeners]]
name = "mtls"
address = "127.0.0.1:{port}"
tls_cert = "{pki['server.pem']}"
tls_key = "{pki['server.key']}"
client_ca = "{pki['ca.pem']}"
roles = ["health"]
[server.listeners.identities]
"uri:spiffe://sealbox/admin" = ["metadata", "inference", "model-repository"]
"cn:bob" = ["metadata", "inference"]
'''
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1], server=listener).start()
    return daemon, f"127.0.0.1:{port}", pki


def _client(target, pki, who):
    from sealbox.client import Client
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca.pem"].read_bytes(),
        private_key=pki[f"{who}.key"].read_bytes() if who else None,
        certificate_chain=pki[f"{who}.pem"].read_bytes() if who else None)
    return Client(target, timeout=10, admin_target=target, credentials=credentials)


def _outcome(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def test_mtls_identities_map_to_roles(mtls_daemon):
    daemon, target, pki = mtls_daemon
    x = np.ones((2, 4), np.float32)
    results = {}
    for who in ("alice", "bob", "rogue", None):
        with _client(target, pki, who) as c:
            results[who] = {"live": _outcome(c.live), "infer": _outcome(lambda: c.infer("demo", {"x": x})),
                            "index": _outcome(c.models), "unload": _outcome(lambda: c.unload("demo")),
                            "load": _outcome(lambda: c.load("demo"))}
    assert results["alice"] == {"live": "OK", "infer": "OK", "index": "OK", "unload": "OK", "load": "OK"}
    assert results["bob"] == {"live": "OK", "infer": "OK", "index": "PERMISSION_DENIED",
                              "unload": "PERMISSION_DENIED", "load": "PERMISSION_DENIED"}
    # A wrong CA or no certificate: refused in the handshake, no call is served at all.
    assert set(results["rogue"].values()) == {"UNAVAILABLE"}
    assert set(results[None].values()) == {"UNAVAILABLE"}

    events = daemon.audit_events()
    denied = [e for e in events if e["event"] == "call_denied"]
    assert denied and {e["cert_subject"] for e in denied} == {"CN=bob,O=sealbox-test"}
    assert all(e["listener"] == "mtls" and e["transport"] == "mtls" and "cn:bob" in e["cert_sans"] for e in denied)
    unload = [e for e in events if e["event"] == "model_unload"]
    assert len(unload) == 1 and unload[0]["cert_subject"] == "CN=alice,O=sealbox-test"
    assert "uri:spiffe://sealbox/admin" in unload[0]["cert_sans"] and unload[0]["peer"].startswith("ipv4:127.0.0.1:")
    with daemon.client() as client:
        assert client.status("demo").state == "READY"


def test_plain_tcp_client_cannot_talk_to_the_mtls_listener(mtls_daemon):
    daemon, target, pki = mtls_daemon
    from sealbox.client import Client
    with Client(target, timeout=5, admin_target=target) as c:
        assert _outcome(c.live) == "UNAVAILABLE"
        assert _outcome(c.models) == "UNAVAILABLE"
