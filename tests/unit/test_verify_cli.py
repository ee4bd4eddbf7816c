"""The publisher CLI (sealbox hash / sign / verify): outputs and exit codes."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from tests.support.pki import PKI, make_model, sealbox_cli, write_key  # noqa: E402

from sealbox.client import publisher as publisher_cli  # noqa: E402


def test_hash_prints_a_pin_manifest(tmp_path, capsys):
    model = make_model(tmp_path / "m", {"b.bin": b"bb", "a/x.bin": b"x", "a-b": b"", "model.sig": b"not hashed"})
    assert publisher_cli.main(["hash", str(model)]) == 0
    h = {n: hashlib.sha256(d).digest() for n, d in {"a/x.bin": b"x", "a-b": b"", "b.bin": b"bb"}.items()}
    order = ["a/x.bin", "a-b", "b.bin"]  # component-wise, as model_signing orders resources
    total = hashlib.sha256(b"".join(h[n] for n in order)).hexdigest()
    assert capsys.readouterr().out == "".join(f"{h[n].hex()}  {n}\n" for n in order) + f"# sealbox-digest sha256:{total}\n"


def test_sign_and_verify_exit_codes(tmp_path):
    key, pub = write_key(tmp_path / "k.pem")
    _, other_pub = write_key(tmp_path / "other.pem")
    model = make_model(tmp_path / "m")
    sig = model / "model.sig"

    r = sealbox_cli("sign", "key", model, "--private-key", key, "--version", "1.1", "--model-name", "demo")
    assert r.returncode == 0, r.stderr
    r = sealbox_cli("verify", model, "--signature", sig, "--public-key", pub, "--model-name", "demo")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("verified: 3 files, sha256:") and r.stdout.endswith(", version 1.1\n")

    r = sealbox_cli("verify", model, "--signature", sig, "--public-key", other_pub, "--model-name", "demo")
    assert r.returncode == 1
    assert r.stderr.startswith(f"sealbox verify: refused: {sig}: signature: signed by key sha256:")

    (model / "config.json").write_text("{}")
    r = sealbox_cli("verify", model, "--signature", sig, "--public-key", pub, "--model-name", "demo")
    assert r.returncode == 1
    assert r.stderr == (f"sealbox verify: refused: {model}/config.json: digest: sha256 digest differs "
                        f"from the one in {sig}\n")

    r = sealbox_cli("verify", model, "--signature", sig, "--public-key", tmp_path / "missing.pub")
    assert r.returncode == 2
    assert r.stderr == f"sealbox verify: [Errno 2] No such file or directory: '{tmp_path}/missing.pub'\n"

    r = sealbox_cli("sign", "key", model, "--private-key", key, "--version", "1.2")
    assert r.returncode == 2 and r.stderr == "sealbox sign: --version and --model-name go together\n"

    r = sealbox_cli("verify", model, "--signature", sig)  # no trust given: argparse usage error
    assert r.returncode == 2 and "one of the arguments --public-key --certificate-chain is required" in r.stderr


def test_sign_refuses_a_symlink(tmp_path):
    key, _ = write_key(tmp_path / "k.pem")
    model = make_model(tmp_path / "m", {"a.bin": b"a"})
    (model / "b.bin").symlink_to("/etc/hostname")
    assert publisher_cli.main(["sign", "key", str(model), "--private-key", str(key)]) == 1
    assert not (model / "model.sig").exists()


def test_verify_certificate_pins_the_identity(tmp_path):
    pki = PKI(tmp_path / "pki")
    model = make_model(tmp_path / "m")
    assert publisher_cli.main(["sign", "certificate", str(model), "--private-key", str(pki.leaf_key),
                               "--signing-certificate", str(pki.leaf), "--certificate-chain", str(pki.inter)]) == 0
    base = ["verify", str(model), "--signature", str(model / "model.sig"), "--certificate-chain", str(pki.root)]
    assert publisher_cli.main(base + ["--identity", f"email:{pki.email}"]) == 0
    assert publisher_cli.main(base + ["--identity", "email:mallory@example.com"]) == 1


def test_verify_of_a_key_signed_model_imports_only_what_it_needs(tmp_path):
    """Start-up is a third of `sealbox verify`'s wall time on 1 GiB: a key-signed model's verify
    runs (really, through the CLI's entry) without X.509, gRPC, protobuf, numpy or the worker contract."""
    key, pub = write_key(tmp_path / "k.pem")
    model = make_model(tmp_path / "m")
    assert publisher_cli.main(["sign", "key", str(model), "--private-key", str(key)]) == 0
    code = ("import sys; from sealbox.client import cli; rc = cli.main(['verify', sys.argv[1], '--public-key', "
            "sys.argv[2]]); print(rc, sorted(m for m in sys.modules if m.startswith(('cryptography.x509', 'grpc', "
            "'google.protobuf', 'numpy', 'sealbox.proto.contract'))))")
    out = subprocess.run([sys.executable, "-c", code, str(model), str(pub)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "0 []", out.stdout + out.stderr


@pytest.mark.parametrize("argv", [["sign"], ["verify", "x"], ["nonsense"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        publisher_cli.main(argv)
    assert info.value.code == 2
