"""Shared by tests/test_frontdoor_*.py: an unprivileged local user, a directory it can reach, a test PKI,
and small gRPC helpers. Nothing here is mocked: the users, sockets and certificates are real."""
from __future__ import annotations

import datetime
import grp
import ipaddress
import json
import os
import pathlib
import pwd
import secrets
import subprocess
import uuid

import psutil
import pytest

from tests.support import PYTHON, RUN_ROOT

OIP = "/inference.GRPCInferenceService/"
MiB = 2**20


@pytest.fixture
def caller_user():
    """A fresh system user (with its own group) created for this test and removed after it."""
    name = f"sbxcall{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
                   check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield {"name": name, "uid": entry.pw_uid, "gid": entry.pw_gid, "group": grp.getgrgid(entry.pw_gid).gr_name}
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def shared_dir():
    """A root-owned 0755 directory every local user can traverse (pytest's tmp dirs are 0700)."""
    import shutil
    path = pathlib.Path(RUN_ROOT) / f"door-{uuid.uuid4().hex[:10]}"
    path.mkdir(mode=0o755, parents=True)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_as(user: dict, code: str, *args: str, timeout: float = 120) -> dict:
    """Run `python -c code args...` as `user`; the script prints one JSON object."""
    result = subprocess.run([PYTHON, "-c", code, *args], user=user["uid"], group=user["gid"], extra_groups=[],
                            capture_output=True, text=True, timeout=timeout, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "HOME": "/"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def worker_tree(daemon, model: str) -> list[psutil.Process]:
    """The bwrap process of `model`'s current worker and everything below it (found by its socket dir name)."""
    marker = f"{daemon.proc.pid}-{model}-"
    for proc in psutil.Process(daemon.proc.pid).children():
        try:
            if any(marker in arg for arg in proc.cmdline()):
                return [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
    return []


def infer_bytes(model: str, rows: int = 1) -> bytes:
    """A ModelInferRequest for the demo model (x: FP32 [rows, 4]) as raw bytes."""
    import numpy as np
    from sealbox.proto import tensors
    return tensors.encode_request(model, {"x": np.ones((rows, 4), np.float32)}, None)


# ---- a test PKI (cryptography), never for production ----------------------------------------------
def make_pki(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """ca, server (SAN 127.0.0.1, ::1), alice (CN=alice, URI spiffe://sealbox/admin), bob (CN=bob),
    and rogue (CN=alice too, from another CA). Returns name -> path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sealbox-test"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(ca_key, ca_cert, cn, sans, server):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    directory.mkdir(parents=True, exist_ok=True)
    out = {}

    def write(stem, key, cert):
        out[f"{stem}.pem"] = directory / f"{stem}.pem"
        out[f"{stem}.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            out[f"{stem}.key"] = directory / f"{stem}.key"
            out[f"{stem}.key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
            os.chmod(out[f"{stem}.key"], 0o600)

    ca_key, ca_cert = ca("sealbox test CA")
    rogue_key, rogue_cert = ca("rogue CA")
    write("ca", None, ca_cert)
    write("server", *leaf(ca_key, ca_cert, "sealboxd", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.IPAddress(ipaddress.ip_address("::1"))], True))
    write("alice", *leaf(ca_key, ca_cert, "alice", [x509.UniformResourceIdentifier("spiffe://sealbox/admin")], False))
    write("bob", *leaf(ca_key, ca_cert, "bob", [], False))
    write("rogue", *leaf(rogue_key, rogue_cert, "alice", [], False))
    return out
