"""Real keys, certificates and signed models for the tests.

Real keys and certificates made with `cryptography`, real models on disk, and
helpers to run the upstream `model_signing` tool and our publisher CLI.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import MODEL_SIGNING, SHARED, needs_shared  # noqa: F401 (re-exported for the tests)

NOW = datetime.datetime.now(datetime.timezone.utc)


def write_key(path: Path, curve=None) -> tuple[Path, Path]:
    """Writes PATH (private PEM, mode 0600) and PATH.pub; returns both paths."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    pub = path.with_suffix(".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool, email: str | None = None,
          not_before=None, not_after=None) -> x509.Certificate:
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before or NOW - datetime.timedelta(days=1))
         .not_valid_after(not_after or NOW + datetime.timedelta(days=365))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        if email:
            b = b.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    return b.sign(issuer_key, hashes.SHA384())


def _pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


class PKI:
    """root -> intermediate -> leaf (email SAN, codeSigning), plus an expired
    leaf and an unrelated root, all written as PEM files under `d`."""

    def __init__(self, d: Path, email: str = "publisher@example.com", name: str = "test"):
        d.mkdir(parents=True, exist_ok=True)
        root_key = ec.generate_private_key(ec.SECP384R1())
        inter_key = ec.generate_private_key(ec.SECP384R1())
        self.root = _pem(d / "root.pem", _cert(f"{name}-root", root_key, f"{name}-root", root_key, ca=True))
        inter = _cert(f"{name}-intermediate", inter_key, f"{name}-root", root_key, ca=True)
        self.inter = _pem(d / "inter.pem", inter)
        self.leaf_key, _ = write_key(d / "leaf.key")
        leaf_priv = serialization.load_pem_private_key(self.leaf_key.read_bytes(), None)
        self.leaf = _pem(d / "leaf.pem", _cert("signer", leaf_priv, f"{name}-intermediate", inter_key, ca=False, email=email))
        self.expired_leaf = _pem(d / "expired.pem", _cert(
            "signer", leaf_priv, f"{name}-intermediate", inter_key, ca=False, email=email,
            not_before=NOW - datetime.timedelta(hours=20), not_after=NOW - datetime.timedelta(hours=1)))
        self.email = email


def make_model(d: Path, files: dict[str, bytes] | None = None) -> Path:
    files = files if files is not None else {
        "config.json": b'{"layers": 2}\n',
        "weights/w0.bin": os.urandom(3000),
        "weights/w1.bin": os.urandom(5000),
    }
    for name, data in files.items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return d


def run(*args, check=True, cwd=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def upstream(*args, check=True, cwd=None) -> subprocess.CompletedProcess:
    return run(MODEL_SIGNING, *args, check=check, cwd=cwd)


def sealbox_cli(*args, check=False) -> subprocess.CompletedProcess:
    """Our publisher CLI in its own process, as a user would run it."""
    code = "import sys; from sealbox.client import publisher; sys.exit(publisher.main(sys.argv[1:]))"
    return run(sys.executable, "-c", code, *args, check=check)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))



def make_ec_key(directory: Path, name: str = "signer", curve=None) -> tuple[Path, Path]:
    """DIRECTORY/NAME.key and DIRECTORY/NAME.pub."""
    return write_key(directory / f"{name}.key", curve)


def upstream_sign(model_dir: Path, private_key: Path) -> Path:
    """Sign with the upstream OpenSSF `model_signing` CLI (key method), signature inside the model dir."""
    signature = model_dir / "model.sig"
    upstream("sign", "key", model_dir, "--private_key", private_key, "--signature", signature)
    return signature
