"""Interop with the upstream OpenSSF model_signing tool, both ways, and its
published test vectors."""
from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from tests.support.pki import PKI, SHARED, make_model, needs_shared, run, sealbox_cli, upstream, write_key  # noqa: E402

from sealbox.daemon.config import policy_from_toml  # noqa: E402
from sealbox.trust import VerificationError, verify_model  # noqa: E402


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    d = tmp_path_factory.mktemp("material")
    key, pub = write_key(d / "p384.pem")
    from cryptography.hazmat.primitives.asymmetric import ec
    key521, pub521 = write_key(d / "p521.pem", ec.SECP521R1())
    return {"key": key, "pub": pub, "key521": key521, "pub521": pub521, "pki": PKI(d / "pki")}


def contents(vm) -> dict[str, bytes]:
    return {n: os.pread(fd, vm.sizes[n] + 1, 0) for n, fd in vm.files.items()}


def on_disk(model: Path, names) -> dict[str, bytes]:
    return {n: (model / n).read_bytes() for n in names}


def test_upstream_key_signature_verifies_in_sealbox(tmp_path, material):
    model = make_model(tmp_path / "m")
    upstream("sign", "key", model, "--private_key", material["key521"], "--signature", model / "model.sig")
    pol = policy_from_toml({"sources": [str(tmp_path)], "public_keys": [str(material["pub521"])]}, "t")
    with verify_model("m", str(model), pol, str(tmp_path / "state"), None) as vm:
        assert contents(vm) == on_disk(model, ["config.json", "weights/w0.bin", "weights/w1.bin"])


def test_upstream_certificate_chain_signature_verifies_in_sealbox(tmp_path, material):
    pki = material["pki"]
    model = make_model(tmp_path / "m")
    upstream("sign", "certificate", model, "--private_key", pki.leaf_key, "--signing_certificate", pki.leaf,
             "--certificate_chain", pki.inter, "--signature", model / "model.sig")
    pol = policy_from_toml({"sources": [str(tmp_path)], "certificates": [
        {"roots": str(pki.root), "identities": [f"email:{pki.email}"]}]}, "t")
    with verify_model("m", str(model), pol, None, None) as vm:
        assert vm.signer == f"email:{pki.email}"
        assert contents(vm) == on_disk(model, ["config.json", "weights/w0.bin", "weights/w1.bin"])


@pytest.mark.parametrize("serialization", [
    "use_shard_serialization(shard_size=1024)",
    "use_file_serialization(hashing_algorithm='blake3')",
    "use_file_serialization(hashing_algorithm='blake2')",
])
def test_upstream_shards_blake3_blake2_verify_in_sealbox(tmp_path, material, serialization):
    # The CLI has no shards or hash options: the upstream library API it wraps does.
    model = make_model(tmp_path / "m", {"a.bin": os.urandom(2500), "b/c.bin": os.urandom(1024), "d.txt": b"x"})
    code = ("import pathlib, sys; from model_signing import signing, hashing; m = pathlib.Path(sys.argv[1]);"
            "c = signing.Config().use_elliptic_key_signer(private_key=sys.argv[2]);"
            f"c.set_hashing_config(hashing.Config().{serialization}.set_ignored_paths(paths=[m / 'model.sig']));"
            "c.sign(m, m / 'model.sig')")
    run(sys.executable, "-c", code, model, material["key"])
    pol = policy_from_toml({"sources": [str(tmp_path)], "public_keys": [str(material["pub"])]}, "t")
    with verify_model("m", str(model), pol, None, None) as vm:
        assert contents(vm) == on_disk(model, ["a.bin", "b/c.bin", "d.txt"])
    # A flipped byte in the middle shard is caught with the shard named.
    data = bytearray((model / "a.bin").read_bytes())
    data[1500] ^= 0xFF
    (model / "a.bin").write_bytes(bytes(data))
    with pytest.raises(VerificationError) as info:
        verify_model("m", str(model), pol, None, None)
    if "shard" in serialization:
        assert str(info.value) == f"{model}/a.bin bytes 1024-2048: digest: sha256 digest differs from the one in {model}/model.sig"
    else:
        alg = "blake3" if "blake3" in serialization else "blake2b"
        assert str(info.value) == f"{model}/a.bin: digest: {alg} digest differs from the one in {model}/model.sig"


def test_sealbox_key_signature_verifies_upstream(tmp_path, material):
    model = make_model(tmp_path / "m")
    (model / ".gitattributes").write_text("* binary\n")
    r = sealbox_cli("sign", "key", model, "--private-key", material["key"], "--version", "1.0", "--model-name", "m")
    assert r.returncode == 0, r.stderr
    assert (model / "model.release.sig").exists()
    r = upstream("verify", "key", model, "--signature", model / "model.sig", "--public_key", material["pub"])
    assert "Verification succeeded" in r.stdout
    # ... and upstream refuses it once the model changes, like we do.
    (model / "config.json").write_text("{}")
    r = upstream("verify", "key", model, "--signature", model / "model.sig", "--public_key", material["pub"], check=False)
    assert r.returncode != 0


def test_sealbox_certificate_signature_verifies_upstream(tmp_path, material):
    pki = material["pki"]
    model = make_model(tmp_path / "m")
    sig = tmp_path / "out.sig"
    r = sealbox_cli("sign", "certificate", model, "--private-key", pki.leaf_key, "--signing-certificate", pki.leaf,
                    "--certificate-chain", pki.inter, "--signature", sig)
    assert r.returncode == 0, r.stderr
    r = upstream("verify", "certificate", model, "--signature", sig, "--certificate_chain", pki.root)
    assert "Verification succeeded" in r.stdout
    r = sealbox_cli("verify", model, "--signature", sig, "--certificate-chain", pki.root, "--identity", f"email:{pki.email}")
    assert r.returncode == 0, r.stderr
    assert f"signer email:{pki.email}" in r.stdout


# ---- upstream's published test vectors ---------------------------------------------------

VECTORS = SHARED / "interop" / "model-transparency-test-vectors.json"


def _vectors():
    if not VECTORS.exists():
        return []
    return sorted(json.loads(VECTORS.read_text())["vectors"].items())


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vectors")
    for name, b64 in json.loads(VECTORS.read_text())["files"].items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(base64.b64decode(b64))
        p.chmod(0o644)
    return d


@needs_shared()
@pytest.mark.parametrize("name, vector", _vectors() or [("absent", {})], ids=lambda v: v if isinstance(v, str) else "")
def test_upstream_vectors(vector_dir, name, vector):
    vw = vector["verify_with"]
    table = {"sources": [str(vector_dir)], "signature": str(vector_dir / vector["signature"])}
    if vw["method"] == "key":
        table["public_keys"] = [str(vector_dir / vw["public_key"])]
    elif vw["method"] == "certificate":
        # Upstream's leaf is a CA certificate with no SAN: pin its subject.
        table["certificates"] = [{"roots": str(vector_dir / vw["certificate_chain"][0]),
                                  "identities": ["subject:CN=intermediate-ca"]}]
    else:
        # Keyless, verified offline against the production trust root sigstore-python embeds.
        table["sigstore"] = [{"trusted_root": SIGSTORE_ROOT, "identities": [vw["identity"]], "issuer": vw["oidc_issuer"]}]
    if vw.get("ignore_paths"):
        # Upstream's verifier is told to skip these; ours drops them (never handed over).
        table["ignore_paths"] = [os.path.relpath(p, vector["model_path"]) for p in vw["ignore_paths"]]
    pol = policy_from_toml(table, name)
    model = vector_dir / vector["model_path"]
    sig = vector_dir / vector["signature"]
    if name.startswith("v0.2."):
        # Pre-1.0: a different, buggy DSSE encoding and predicate; refused by its predicate,
        # before its signature is checked (which would fail only as "does not verify").
        with pytest.raises(VerificationError) as info:
            verify_model(name, str(model), pol, None, None)
        assert str(info.value) == (f"{sig}: format: the legacy pre-1.0 model_signing format (predicate "
                                   "https://model_signing/Digests/v0.1): not supported; re-sign with model_signing >= 1.0")
        assert info.value.check == "format"
    else:
        with verify_model(name, str(model), pol, None, None) as vm:
            want = sorted(p.name for p in (model.iterdir() if model.is_dir() else [model])
                          if p.name not in ("model.sig", "ignore-me"))
            assert sorted(vm.files) == want
            for n, fd in vm.files.items():
                assert os.pread(fd, 100, 0) == ((model / n) if model.is_dir() else model).read_bytes()
            if vw["method"] == "sigstore":
                assert vm.signer == f"sigstore:{vw['identity']} ({vw['oidc_issuer']})"


def _sigstore_root() -> str:
    import importlib.resources
    return str(importlib.resources.files("sigstore") / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev" / "trusted_root.json")


SIGSTORE_ROOT = _sigstore_root()


@needs_shared()
def test_keyless_refusals(vector_dir):
    name = "v1.1.0-sigstore"
    model, sig = vector_dir / name, vector_dir / name / "model.sig"
    base = {"sources": [str(vector_dir)], "ignore_paths": ["ignore-me"]}
    issuer = "https://sigstore.verify.ibm.com/oauth2"
    # No keyless trust configured: refused, whatever keys are trusted.
    pol = policy_from_toml({**base, "public_keys": [str(vector_dir / "keys/certificate/signing-key-pub.pem")]}, "t")
    with pytest.raises(VerificationError) as info:
        verify_model("m", str(model), pol, None, None)
    assert str(info.value) == (f"{sig}: bundle: a keyless Sigstore bundle, but the policy pins no sigstore trusted root; "
                               f"sign with a key or a certificate chain, or configure sigstore")
    # Wrong pinned identity.
    pol = policy_from_toml({**base, "sigstore": [{"trusted_root": SIGSTORE_ROOT, "identities": ["mallory@example.com"],
                                                       "issuer": issuer}]}, "t")
    with pytest.raises(VerificationError) as info:
        verify_model("m", str(model), pol, None, None)
    assert str(info.value) == (f"{sig}: signature: keyless verification failed: {SIGSTORE_ROOT}: Certificate's SANs do "
                               f"not match mallory@example.com; actual SANs: {{'stefanb@us.ibm.com'}}")
    # A flipped byte in a signed file is still caught after a good keyless signature.
    import shutil
    copy = vector_dir / "keyless-copy"
    shutil.copytree(model, copy)
    for p in [copy, *copy.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (copy / "signme-1").write_bytes(b"signme-X")
    pol = policy_from_toml({**base, "sigstore": [{"trusted_root": SIGSTORE_ROOT, "identities": ["stefanb@us.ibm.com"],
                                                       "issuer": issuer}]}, "t")
    with pytest.raises(VerificationError) as info:
        verify_model("m", str(copy), pol, None, None)
    assert str(info.value) == f"{copy}/signme-1: digest: sha256 digest differs from the one in {copy}/model.sig"


def test_upstream_allow_symlinks_inside_the_directory(tmp_path, material):
    model = make_model(tmp_path / "m", {"weights/real.bin": os.urandom(4000), "config.json": b"{}"})
    (model / "current.bin").symlink_to("weights/real.bin")
    upstream("sign", "key", model, "--private_key", material["key"], "--signature", model / "model.sig", "--allow_symlinks")
    pol = policy_from_toml({"sources": [str(tmp_path)], "public_keys": [str(material["pub"])]}, "t")
    with verify_model("m", str(model), pol, None, None) as vm:
        # The link is handed over under its signed name, with the target's verified content.
        assert contents(vm) == on_disk(model, ["config.json", "current.bin", "weights/real.bin"])


def test_sealbox_blake3_signature_verifies_upstream(tmp_path, material):
    model = make_model(tmp_path / "m")
    r = sealbox_cli("sign", "key", model, "--private-key", material["key"], "--hash", "blake3")
    assert r.returncode == 0, r.stderr
    statement = json.loads(base64.b64decode(json.loads((model / "model.sig").read_text())["dsseEnvelope"]["payload"]))
    assert {r["algorithm"] for r in statement["predicate"]["resources"]} == {"blake3"}
    # Upstream's CLI always hashes with sha256; its library reads the hash from the bundle.
    code = ("import sys; from model_signing import verifying;"
            "verifying.Config().use_elliptic_key_verifier(public_key=sys.argv[2]).verify(sys.argv[1], sys.argv[1] + '/model.sig');"
            "print('upstream verified')")
    assert run(sys.executable, "-c", code, model, material["pub"]).stdout == "upstream verified\n"
    pol = policy_from_toml({"sources": [str(tmp_path)], "public_keys": [str(material["pub"])]}, "t")
    with verify_model("m", str(model), pol, None, None) as vm:
        assert contents(vm) == on_disk(model, ["config.json", "weights/w0.bin", "weights/w1.bin"])
