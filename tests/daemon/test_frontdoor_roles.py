"""Who may call what: an unprivileged local user, created by the test, against a real sealboxd.

Before: with `tcp` set any local user could unload a production model over loopback (and the
audit event named no caller). Now the inference socket and a plain TCP listener grant health,
metadata and inference only; load/unload/index answer PERMISSION_DENIED there and are audited
with the listener; the admin socket (0600 root) cannot even be opened by that user.
"""
from __future__ import annotations

import os
import stat
import subprocess

import grpc
import numpy as np
import pytest

from tests.support import PYTHON
from tests.support.frontdoor import caller_user, run_as, shared_dir  # noqa: F401 (fixtures)

CALLER = r"""
import errno, json, socket, sys
import grpc, numpy as np
from sealbox.client import Client
target, admin = sys.argv[1], sys.argv[2]
out = {}
with Client(target, admin_target=target, timeout=20) as c:   # every call over the inference listener
    out["live"] = c.live()
    out["infer"] = c.infer("demo", {"x": np.ones((1, 4), np.float32)})["y"].shape
    out["metadata"] = c.metadata("demo").name
    for name, call in (("index", c.models), ("unload", lambda: c.unload("demo")), ("load", lambda: c.load("demo"))):
        try:
            call()
            out[name] = "OK"
        except grpc.RpcError as e:
            out[name] = [e.code().name, e.details()]
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(admin[len("unix:"):])
    out["admin_connect"] = "connected"
except OSError as e:
    out["admin_connect"] = errno.errorcode[e.errno]
print(json.dumps(out))
"""

DENIED = "role 'model-repository' is not permitted to this caller on this listener"


def test_unprivileged_user_may_infer_but_not_load_or_unload(daemon_factory, demo_model, keys, caller_user,
                                                           shared_dir):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1], tcp=True, socket_dir=shared_dir,
                            server=f'socket_group = "{caller_user["group"]}"').start()
    st = os.stat(daemon.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, caller_user["gid"])
    st = os.stat(daemon.admin_socket)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)

    for target in (daemon.target, daemon.tcp_target):
        out = run_as(caller_user, CALLER, target, daemon.admin_target)
        assert out["live"] is True and out["infer"] == [1, 3] and out["metadata"] == "demo", (target, out)
        for call in ("index", "unload", "load"):
            assert out[call] == ["PERMISSION_DENIED", DENIED], (target, call, out)
        assert out["admin_connect"] == "EACCES"

    with daemon.admin_client() as admin:   # nobody unloaded it
        assert admin.status("demo").state == "READY"
        admin.unload("demo")
        admin.load("demo")
    denied = [e for e in daemon.audit_events() if e["event"] == "call_denied"]
    assert {(e["listener"], e["transport"], e["role"]) for e in denied} == {
        ("public", "unix", "model-repository"), ("tcp", "tcp", "model-repository")}
    assert {e["method"].rsplit("/", 1)[1] for e in denied} == {
        "RepositoryIndex", "RepositoryModelUnload", "RepositoryModelLoad"}
    assert all(e["peer"].startswith("ipv4:127.0.0.1:") for e in denied if e["transport"] == "tcp")
    # The admin's own calls are audited with the listener that carried them.
    unload = [e for e in daemon.audit_events() if e["event"] == "model_unload"]
    assert unload and unload[-1]["listener"] == "admin" and unload[-1]["transport"] == "unix"
    loads = [e for e in daemon.audit_events() if e["event"] == "model_load" and e.get("listener") == "admin"]
    assert loads and loads[-1]["verdict"] == "ready"


def test_a_flood_of_refusals_writes_a_bounded_audit(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1]).start()
    from sealbox.proto import inference_pb2 as pb
    with grpc.insecure_channel(daemon.target) as channel:   # the inference socket (root may open it)
        unload = channel.unary_unary("/inference.GRPCInferenceService/RepositoryModelUnload",
                                     request_serializer=pb.RepositoryModelUnloadRequest.SerializeToString)
        for _ in range(500):
            with pytest.raises(grpc.RpcError) as err:
                unload(pb.RepositoryModelUnloadRequest(model_name="demo"), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with daemon.client() as client:
        assert client.status("demo").state == "READY"
    daemon.stop()   # a clean stop writes the summary of the open window
    events = daemon.audit_events()
    denied = [e for e in events if e["event"] == "call_denied"]
    suppressed = [e for e in events if e["event"] == "denied_suppressed"]
    assert 1 <= len(denied) <= 5 * 4   # the first 5 of each 10 s window (the flood takes a few seconds)
    assert sum(e["count"] for e in suppressed) + len(denied) == 500
    assert all(e["listener"] == "public" for e in denied + suppressed)


def test_unknown_methods_and_shared_memory_follow_the_roles(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model, "load": False}}, keys[1]).start()
    with grpc.insecure_channel(daemon.target) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/inference.GRPCInferenceService/NoSuchMethod")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with daemon.admin_client() as admin:   # the admin socket has every role, inference included
        assert admin.live() and admin.models()[0].state == "UNLOADED"
        admin.load("demo")
        assert admin.infer("demo", {"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 3)


@pytest.mark.parametrize("server, message", [
    ('tcp = "localhost:8001"', "key 'tcp' must be an IP literal with a port, such as \"127.0.0.1:8001\" or "
                               "\"[::1]:8001\" (no host names such as 'localhost'), not 'localhost:8001'"),
    ('tcp = "0.0.0.0:8001"', "key 'tcp' must be a loopback address with a port, not '0.0.0.0:8001'"),
    ('[[server.listeners]]\naddress = "::1:8001"', "key 'address' must be an IP literal with a port"),
    ('[[server.listeners]]\naddress = "0.0.0.0:8001"',
     "[[server.listeners]] #1: listener listener1: a non-loopback TCP address requires TLS"),
    ('[[server.listeners]]\naddress = "127.0.0.1:8001"\nroles = ["inference", "model-repository"]',
     "listener listener1: TCP without mutual TLS is inference-only"),
    ('[[server.listeners]]\nsocket = "/tmp/x.sock"\nroles = ["admin"]', "key 'roles': unknown role 'admin'"),
    ('[[server.listeners]]\nsocket = "/tmp/x.sock"\naddress = "127.0.0.1:1"',
     "exactly one of the keys 'socket' (Unix) and 'address' (TCP) is required"),
    ('socket_group = "no-such-group-here"', "[server]: key 'socket_group': group 'no-such-group-here' does not exist"),
    ('[server.limits]\ninference_rpcs = 4\nmodel_queue = 3', "[server.limits]: key 'model_queue' must be at least 0"),
    ('[server.limits]\nstreams = "many"', "[server.limits]: key 'streams' must be int, not str"),
])
def test_listener_config_refusals_name_the_key(tmp_path, server, message):
    config = tmp_path / "sealboxd.toml"
    config.write_text(f"[server]\n{server}\n")
    result = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(config), "--check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"sealboxd: config refused: {config}: ")
    assert message in result.stderr
