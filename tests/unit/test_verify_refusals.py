"""Every refusal of verify_model, fed for real, with the exact error asserted.

Each test builds a real model, signs it with a real key or certificate chain
(our publisher or the upstream model_signing tool), breaks one thing, and
checks that verify_model raises the exact error, leaks no fd and audits it.
"""
from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from tests.support.pki import PKI, make_model, open_fds, upstream, write_key  # noqa: E402

from sealbox.client import publisher as publisher_cli  # noqa: E402
from sealbox.daemon.audit import AuditLog  # noqa: E402
from sealbox.daemon.config import policy_from_toml  # noqa: E402
from sealbox.trust import TrustPolicy, VerificationError, verify_model  # noqa: E402

WHERE = "/etc/sealbox/sealbox.toml: [models.m.policy]"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    good, good_pub = write_key(d / "good.pem")
    other, other_pub = write_key(d / "other.pem")
    return {"good": good, "good_pub": good_pub, "other": other, "other_pub": other_pub,
            "pki": PKI(d / "pki"), "other_pki": PKI(d / "other_pki", name="other")}


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "m")


def sign(model: Path, key: Path, *extra: str) -> None:
    assert publisher_cli.main(["sign", "key", str(model), "--private-key", str(key), *extra]) == 0


def policy(tmp_path: Path, **table) -> TrustPolicy:
    table.setdefault("sources", [str(tmp_path)])
    return policy_from_toml(table, WHERE)


def refused(model: Path, pol: TrustPolicy, state_dir=None, name="m") -> tuple[str, dict]:
    """Runs verify_model expecting a refusal; returns the message and the audit record."""
    log = model.parent / "audit.jsonl"
    audit = AuditLog(str(log))
    before = open_fds()
    with pytest.raises(VerificationError) as info:
        verify_model(name, str(model), pol, state_dir, audit)
    assert open_fds() == before, "a refusal leaked file descriptors"
    audit.close()
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["verdict"] == "refused" and record["reason"] == str(info.value)
    return str(info.value), record


def test_accepts_a_good_model_and_hands_over_only_signed_files(tmp_path, model, keys):
    (model / ".git").mkdir()
    (model / ".git" / "config").write_text("[core]\n")
    sign(model, keys["good"])
    log = tmp_path / "audit.jsonl"
    with verify_model("m", str(model), policy(tmp_path, public_keys=[str(keys["good_pub"])]),
                      str(tmp_path / "state"), AuditLog(str(log))) as vm:
        assert sorted(vm.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]
        assert os.pread(vm.files["config.json"], 100, 0) == b'{"layers": 2}\n'
        assert vm.signer.startswith("key:sha256:") and vm.digest.startswith("sha256:")
    record = json.loads(log.read_text())
    assert record["verdict"] == "accepted" and record["signer"] == vm.signer and record["digest"] == vm.digest
    assert "BEGIN" not in log.read_text()  # no key material in the log


def test_flipped_byte(tmp_path, model, keys):
    sign(model, keys["good"])
    w = model / "weights/w0.bin"
    data = bytearray(w.read_bytes())
    data[1234] ^= 1
    w.write_bytes(bytes(data))
    msg, record = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{w}: digest: sha256 digest differs from the one in {model}/model.sig"
    assert record["check"] == "digest"


def test_extra_file(tmp_path, model, keys):
    sign(model, keys["good"])
    (model / "extra.bin").write_bytes(b"surprise")
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/extra.bin: manifest: present but not signed"


def test_missing_file(tmp_path, model, keys):
    sign(model, keys["good"])
    (model / "weights/w1.bin").unlink()
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/weights/w1.bin: manifest: signed but missing"


def test_renamed_file(tmp_path, model, keys):
    sign(model, keys["good"])
    (model / "weights/w1.bin").rename(model / "weights/w9.bin")
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/weights/w9.bin: manifest: present but not signed"


def test_extra_empty_file_in_shards_mode(tmp_path, model, keys):
    # Signed by upstream in shards mode; upstream itself lets the empty file pass.
    code = ("import pathlib, sys; from model_signing import signing, hashing; m = pathlib.Path(sys.argv[1]);"
            "c = signing.Config().use_elliptic_key_signer(private_key=sys.argv[2]);"
            "c.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=1024)"
            ".set_ignored_paths(paths=[m / 'model.sig']));"
            "c.sign(m, m / 'model.sig')")
    from tests.support.pki import run
    run(sys.executable, "-c", code, model, keys["good"])
    (model / "weights/empty.bin").write_bytes(b"")
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/weights/empty.bin: manifest: present but not signed"


def test_symlink_to_a_file_outside(tmp_path, model, keys):
    sign(model, keys["good"])
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (model / "weights/w1.bin").unlink()
    (model / "weights/w1.bin").symlink_to(secret)
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/weights/w1.bin: storage: a symlink to {str(secret)!r}, outside the model directory"


def test_symlink_inside_when_the_signature_forbids_symlinks(tmp_path, model, keys):
    sign(model, keys["good"])
    (model / "weights/w1.bin").unlink()
    (model / "weights/w1.bin").symlink_to("w0.bin")
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/weights/w1.bin: storage: a symlink, and the signature's serialization does not allow symlinks"


def test_hardlink_to_a_file_outside(tmp_path, model, keys):
    sign(model, keys["good"])
    os.link(model / "weights/w0.bin", tmp_path / "elsewhere.bin")
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/weights/w0.bin: storage: has 2 hard links, 1 of them outside the model directory"


def test_group_writable_file(tmp_path, model, keys):
    sign(model, keys["good"])
    (model / "config.json").chmod(0o664)
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/config.json: storage: group- or world-writable (mode 0664)"


def test_world_writable_directory(tmp_path, model, keys):
    sign(model, keys["good"])
    (model / "weights").chmod(0o777)
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/weights: storage: group- or world-writable (mode 0777)"


def test_file_owned_by_another_user(tmp_path, model, keys):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    sign(model, keys["good"])
    os.chown(model / "config.json", 65534, 65534)
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/config.json: storage: owned by uid 65534, not root or the daemon (uid 0)"


def test_fifo(tmp_path, model, keys):
    sign(model, keys["good"])
    os.mkfifo(model / "weights/pipe", 0o644)
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/weights/pipe: storage: a FIFO, not a regular file"


def test_source_outside_the_allowed_prefixes(tmp_path, model, keys):
    sign(model, keys["good"])
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    # A symlink from inside the allowed tree does not help: no symlink below a source is followed.
    (allowed / "m").symlink_to(model)
    pol = policy_from_toml({"sources": [str(allowed)], "public_keys": [str(keys["good_pub"])]}, WHERE)
    msg, record = refused(allowed / "m", pol)
    assert msg == f"{allowed}/m: source: a symlink to '{model}'; below the source {allowed} no symlink is followed"
    assert record["check"] == "source"
    # Named by its real path, it is not under the source at all.
    msg, record = refused(model, pol)
    assert msg == f"{model}: source: resolves to {model}, which is not under an allowed source ({allowed})"
    assert record["check"] == "source"


# ---- the source walk: from the source root down to the model, no symlink, every directory checked --


@pytest.fixture
def deep(tmp_path, keys):
    """A signed model at src/a/b/m, the policy's source src (the config written before any change)."""
    src = tmp_path / "src"
    m = make_model(src / "a" / "b" / "m")
    for d in (src, src / "a", src / "a" / "b"):
        d.chmod(0o755)
    sign(m, keys["good"])
    pol = policy_from_toml({"sources": [str(src)], "public_keys": [str(keys["good_pub"])]}, WHERE)
    return src, m, pol


def test_source_walk_accepts_a_model_below_the_root(tmp_path, deep):
    src, m, pol = deep
    with verify_model("m", str(m), pol, None, None) as vm:
        assert vm.source == str(m) and sorted(vm.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]
    # A symlink above the root is the operator's: the root is what the path leads to.
    (tmp_path / "link").symlink_to(src)
    with verify_model("m", str(tmp_path / "link" / "a" / "b" / "m"), pol, None, None) as vm:
        assert vm.source == str(m)


def test_source_walk_refuses_an_intermediate_symlink_swapped_in(tmp_path, deep):
    src, m, pol = deep
    elsewhere = tmp_path / "elsewhere"
    (src / "a").rename(elsewhere)  # the same signed, well-kept files, now outside the source
    (src / "a").symlink_to(elsewhere)
    msg, record = refused(m, pol)
    assert msg == f"{src}/a: source: a symlink to '{elsewhere}'; below the source {src} no symlink is followed"
    assert record["check"] == "source" and record["source"] == str(m)
    # Pointing inside the source does not help either.
    (src / "a").unlink()
    (src / "c").mkdir(mode=0o755)
    elsewhere.rename(src / "c" / "a")
    (src / "a").symlink_to("c/a")
    msg, _ = refused(m, pol)
    assert msg == f"{src}/a: source: a symlink to 'c/a'; below the source {src} no symlink is followed"


def test_source_walk_refuses_a_group_writable_directory_above_the_model(deep):
    src, m, pol = deep
    (src / "a" / "b").chmod(0o775)
    msg, record = refused(m, pol)
    assert msg == f"{src}/a/b: source: group- or world-writable (mode 0775)"
    assert record["check"] == "source"
    (src / "a" / "b").chmod(0o755)
    src.chmod(0o757)
    msg, _ = refused(m, pol)
    assert msg == f"{src}: source: group- or world-writable (mode 0757)"


def test_source_walk_refuses_a_directory_above_the_model_owned_by_another_user(deep):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    src, m, pol = deep
    os.chown(src / "a", 65534, 65534)
    msg, record = refused(m, pol)
    assert msg == f"{src}/a: source: owned by uid 65534, not root or the daemon (uid 0)"
    assert record["check"] == "source"


def test_source_walk_refuses_what_is_not_a_directory_or_missing(deep):
    src, m, pol = deep
    (src / "a" / "f").write_text("")
    for path, message in ((src / "a" / "x" / "m", f"{src}/a/x: source: No such file or directory"),
                          (src / "a" / "f" / "m", f"{src}/a/f: source: not a directory")):
        before = open_fds()
        with pytest.raises(VerificationError) as info:  # refused() would make the directory for its audit log
            verify_model("m", str(path), pol, None, None)
        assert str(info.value) == message and open_fds() == before


def test_too_big(tmp_path, model, keys):
    sign(model, keys["good"])
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])], max_bytes=4096))
    assert msg == f"{model}: size: 8014 bytes, more than the policy's max_bytes 4096"


def test_wrong_key(tmp_path, model, keys):
    sign(model, keys["other"])
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    hint = json.loads((model / "model.sig").read_text())["verificationMaterial"]["publicKey"]["hint"]
    assert msg == f"{model}/model.sig: signature: signed by key sha256:{hint}, which the policy does not trust"


def test_wrong_key_even_with_a_forged_hint(tmp_path, model, keys):
    sign(model, keys["other"])
    from sealbox.trust.policy import TrustedKey
    good = TrustedKey.load(str(keys["good_pub"]))
    sig = model / "model.sig"
    doc = json.loads(sig.read_text())
    doc["verificationMaterial"]["publicKey"]["hint"] = good.fingerprint
    sig.write_text(json.dumps(doc))
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == (f"{model}/model.sig: signature: the DSSE signature does not verify with "
                   f"{keys['good_pub']} (sha256:{good.fingerprint})")


def _edit_payload(sig: Path, edit) -> None:
    doc = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    edit(statement)
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    sig.write_text(json.dumps(doc))


def test_edited_payload(tmp_path, model, keys):
    sign(model, keys["good"])
    # Make the payload describe a different weight file, keeping it self-consistent.
    (model / "weights/w0.bin").write_bytes(b"evil weights")
    import hashlib

    def edit(st):
        for r in st["predicate"]["resources"]:
            if r["name"] == "weights/w0.bin":
                r["digest"] = hashlib.sha256(b"evil weights").hexdigest()
        st["subject"][0]["digest"]["sha256"] = hashlib.sha256(
            b"".join(bytes.fromhex(r["digest"]) for r in st["predicate"]["resources"])).hexdigest()
    _edit_payload(model / "model.sig", edit)
    from sealbox.trust.policy import TrustedKey
    good = TrustedKey.load(str(keys["good_pub"]))
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == (f"{model}/model.sig: signature: the DSSE signature does not verify with "
                   f"{keys['good_pub']} (sha256:{good.fingerprint})")


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[: len(b) // 2], "not valid JSON (Unterminated string starting at: line 1 column "),
    (lambda b: b"\x00\x01 not json", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    (lambda b: b"\xff\xfe{}", "not valid JSON (not UTF-8 text)"),
    (lambda b: b"", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
])
def test_truncated_or_non_json_signature(tmp_path, model, keys, damage, reason):
    sign(model, keys["good"])
    sig = model / "model.sig"
    sig.write_bytes(damage(sig.read_bytes()))
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg.startswith(f"{sig}: bundle: {reason}")


def test_missing_signature(tmp_path, model, keys):
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/model.sig: storage: missing"


def test_duplicate_json_keys_in_the_statement(tmp_path, model, keys):
    sign(model, keys["good"])
    sig = model / "model.sig"
    doc = json.loads(sig.read_text())
    doc["dsseEnvelope"]["payload"] = base64.b64encode(b'{"_type": "a", "_type": "b"}').decode()
    sig.write_text(json.dumps(doc))
    from sealbox.trust._oms import parse_statement
    with pytest.raises(VerificationError) as info:
        parse_statement(base64.b64decode(doc["dsseEnvelope"]["payload"]), str(sig))
    assert str(info.value) == f"{sig}: statement: not valid JSON (duplicate key '_type')"


@pytest.mark.parametrize("bad_name", ["../escape.bin", "/etc/passwd", "weights/../../x", "a//b"])
def test_bad_resource_names(tmp_path, bad_name):
    from sealbox.trust._oms import parse_statement
    import hashlib
    d = hashlib.sha256(b"x").digest()
    st = {"_type": "https://in-toto.io/Statement/v1", "predicateType": "https://model_signing/signature/v1.0",
          "subject": [{"name": "m", "digest": {"sha256": hashlib.sha256(d).hexdigest()}}],
          "predicate": {"serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False},
                        "resources": [{"name": bad_name, "algorithm": "sha256", "digest": d.hex()}]}}
    with pytest.raises(VerificationError) as info:
        parse_statement(json.dumps(st).encode(), "sig")
    assert str(info.value) == f"sig: manifest: resource name {bad_name!r} is not a plain relative path inside the model"


def test_duplicate_resource_names(tmp_path):
    from sealbox.trust._oms import parse_statement
    import hashlib
    d = hashlib.sha256(b"x").digest()
    r = {"name": "a.bin", "algorithm": "sha256", "digest": d.hex()}
    st = {"_type": "https://in-toto.io/Statement/v1", "predicateType": "https://model_signing/signature/v1.0",
          "subject": [{"name": "m", "digest": {"sha256": hashlib.sha256(d + d).hexdigest()}}],
          "predicate": {"serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False},
                        "resources": [r, r]}}
    with pytest.raises(VerificationError) as info:
        parse_statement(json.dumps(st).encode(), "sig")
    assert str(info.value) == "sig: manifest: duplicate resource name 'a.bin'"


# ---- certificates -------------------------------------------------------------------


def cert_sign(model: Path, pki: PKI, leaf: Path | None = None) -> None:
    upstream("sign", "certificate", model, "--private_key", pki.leaf_key, "--signing_certificate", leaf or pki.leaf,
             "--certificate_chain", pki.inter, "--signature", model / "model.sig")


def cert_policy(tmp_path, pki: PKI, identities=None) -> TrustPolicy:
    return policy(tmp_path, certificates=[{"roots": str(pki.root), "identities": identities or [f"email:{pki.email}"]}])


def test_certificate_chaining_to_an_untrusted_root(tmp_path, model, keys):
    cert_sign(model, keys["other_pki"])
    msg, record = refused(model, cert_policy(tmp_path, keys["pki"], [f"email:{keys['other_pki'].email}"]))
    assert msg.startswith(f"{model}/model.sig: certificate: the certificate chain does not lead to a trusted root: "
                          f"{keys['pki'].root}: ")
    assert record["check"] == "certificate"


def test_expired_leaf(tmp_path, model, keys):
    pki = keys["pki"]
    cert_sign(model, pki, leaf=pki.expired_leaf)
    # Upstream accepts it: it validates the chain at the leaf's notBefore.
    upstream("verify", "certificate", model, "--signature", model / "model.sig", "--certificate_chain", pki.root)
    from cryptography import x509
    leaf = x509.load_pem_x509_certificate(pki.expired_leaf.read_bytes())
    msg, _ = refused(model, cert_policy(tmp_path, pki))
    assert msg.startswith(f"{model}/model.sig: certificate: the signing certificate expired at "
                          f"{leaf.not_valid_after_utc.isoformat()} (now ")
    assert msg.endswith(", clock skew allowed 300s)")


def test_wrong_identity(tmp_path, model, keys):
    pki = keys["pki"]
    cert_sign(model, pki)
    msg, record = refused(model, cert_policy(tmp_path, pki, ["email:someone-else@example.com"]))
    assert msg == (f"{model}/model.sig: identity: signer email:{pki.email}, subject:CN=signer is not among the "
                   f"identities pinned for {pki.root} (email:someone-else@example.com)")
    assert record["check"] == "identity"


def test_key_bundle_when_only_certificates_are_trusted(tmp_path, model, keys):
    sign(model, keys["good"])
    msg, _ = refused(model, cert_policy(tmp_path, keys["pki"]))
    assert msg == f"{model}/model.sig: signature: signed with a key, but the policy trusts no public keys"


# ---- rollback -------------------------------------------------------------------------


def test_rollback_to_a_lower_version(tmp_path, keys):
    state = tmp_path / "state"
    pol = policy(tmp_path, public_keys=[str(keys["good_pub"])])
    v2 = make_model(tmp_path / "v2")
    sign(v2, keys["good"], "--version", "2.0.1", "--model-name", "m")
    v1 = make_model(tmp_path / "v1")
    sign(v1, keys["good"], "--version", "2.0", "--model-name", "m")
    with verify_model("m", str(v1), pol, str(state), None) as vm:
        assert vm.version == "2.0"
    with verify_model("m", str(v2), pol, str(state), None) as vm:
        assert vm.version == "2.0.1"
    assert json.loads((state / "versions.json").read_text()) == {"m": "2.0.1"}
    assert (state / "versions.json").stat().st_mode & 0o777 == 0o600
    msg, record = refused(v1, pol, str(state))
    assert msg == (f"{v1}/model.release.sig: rollback: version 2.0 is lower than version 2.0.1 accepted "
                   f"before for 'm' (allow_downgrade is false)")
    assert record["check"] == "rollback"
    # Stripping the release statement does not get around it either.
    (v1 / "model.release.sig").unlink()
    msg, _ = refused(v1, pol, str(state))
    assert msg == f"{v1}/model.release.sig: rollback: no signed release statement, but version 2.0.1 was accepted before"
    # The operator can allow it explicitly; the recorded highest version stays.
    sign(v1, keys["good"], "--version", "2.0", "--model-name", "m")
    down = policy(tmp_path, public_keys=[str(keys["good_pub"])], allow_downgrade=True)
    with verify_model("m", str(v1), down, str(state), None) as vm:
        assert vm.version == "2.0"
    assert json.loads((state / "versions.json").read_text()) == {"m": "2.0.1"}


def test_min_version(tmp_path, model, keys):
    sign(model, keys["good"], "--version", "1.9", "--model-name", "m")
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])], min_version="1.10"))
    assert msg == f"{model}/model.release.sig: rollback: version 1.9 is below the policy's min_version 1.10"


def test_release_statement_moved_to_other_content(tmp_path, keys):
    a = make_model(tmp_path / "a")
    b = make_model(tmp_path / "b")
    sign(a, keys["good"], "--version", "9.0", "--model-name", "m")
    sign(b, keys["good"])
    (b / "model.release.sig").write_bytes((a / "model.release.sig").read_bytes())
    msg, _ = refused(b, policy(tmp_path, public_keys=[str(keys["good_pub"])]), str(tmp_path / "state"))
    assert msg == (f"{b}/model.release.sig: release: is bound to other content "
                   f"(its subject digest differs from the model signature's)")


def test_release_for_another_model_name(tmp_path, model, keys):
    sign(model, keys["good"], "--version", "3.0", "--model-name", "other")
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]), str(tmp_path / "state"))
    assert msg == f"{model}/model.release.sig: release: is for model 'other', not 'm'"


def test_release_signed_by_another_trusted_signer(tmp_path, keys):
    a = make_model(tmp_path / "a")
    sign(a, keys["other"], "--version", "9.0", "--model-name", "m")
    release = (a / "model.release.sig").read_bytes()
    sign(a, keys["good"])
    (a / "model.release.sig").write_bytes(release)
    pol = policy(tmp_path, public_keys=[str(keys["good_pub"]), str(keys["other_pub"])])
    msg, _ = refused(a, pol, str(tmp_path / "state"))
    assert msg.startswith(f"{a}/model.release.sig: release: signed by key:sha256:")
    assert ", but the model by key:sha256:" in msg


# ---- name binding: the policy's model_name against the signed statement's subject name --


def _subject_name(sig: Path) -> str:
    bundle = json.loads(sig.read_text())
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))["subject"][0]["name"]


def test_model_name_binding(tmp_path, keys):
    # Signed by the upstream tool in a directory named `other`: the statement carries "other".
    other = make_model(tmp_path / "other")
    upstream("sign", "key", other, "--private_key", keys["good"], "--signature", other / "model.sig")
    assert _subject_name(other / "model.sig") == "other"
    bound = policy(tmp_path, public_keys=[str(keys["good_pub"])], model_name="victim")
    msg, record = refused(other, bound, str(tmp_path / "state"), name="victim")
    assert msg == f"{other}/model.sig: name: signed for model 'other', but the policy's model_name is 'victim'"
    assert record["check"] == "name" and record["source"] == str(other)
    assert not (tmp_path / "state" / "versions.json").exists()

    # Without the key: today's behaviour, the name in the signature is not checked.
    with verify_model("victim", str(other), policy(tmp_path, public_keys=[str(keys["good_pub"])]), None, None) as vm:
        assert sorted(vm.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]

    # `sealbox sign --model-name victim` writes the name into the statement and the release statement.
    sign(other, keys["good"], "--model-name", "victim", "--version", "1.0")
    assert _subject_name(other / "model.sig") == "victim"
    assert _subject_name(other / "model.release.sig") == "victim"
    with verify_model("victim", str(other), bound, str(tmp_path / "state"), None) as vm:
        assert vm.version == "1.0" and len(vm.files) == 3
    # ... which upstream still verifies: it ignores the name.
    upstream("verify", "key", other, "--signature", other / "model.sig", "--public_key", keys["good_pub"],
             "--ignore-paths", other / "model.release.sig")

    # --model-name alone (no release statement) binds the name too; the default is the directory's name.
    sign(other, keys["good"], "--model-name", "victim")
    assert _subject_name(other / "model.sig") == "victim"
    sign(other, keys["good"])
    assert _subject_name(other / "model.sig") == "other"
    msg, _ = refused(other, bound, name="victim")
    assert msg == f"{other}/model.sig: name: signed for model 'other', but the policy's model_name is 'victim'"


# ---- unsigned models pinned by digest ------------------------------------------------


def test_pinned_digests(tmp_path, model):
    r = publisher_cli.main  # the pin manifest is what `sealbox hash` prints
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert r(["hash", str(model)]) == 0
    pins = tmp_path / "m.sha256"
    pins.write_text(out.getvalue())
    pins.chmod(0o644)
    pol = policy(tmp_path, require_signature=False, pinned_manifest=str(pins))
    with verify_model("m", str(model), pol, str(tmp_path / "state"), None) as vm:
        assert sorted(vm.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]
        assert out.getvalue().endswith(f"# sealbox-digest {vm.digest}\n")
        assert vm.signer is None and vm.version is None
    (model / "config.json").write_bytes(b"{}")
    msg, _ = refused(model, pol)
    assert msg == f"{model}/config.json: digest: sha256 digest differs from the one in {pins}"
    # A pin manifest inside the model directory pins nothing.
    inside = model / "pins.sha256"
    inside.write_text(out.getvalue())
    msg, _ = refused(model, policy(tmp_path, require_signature=False, pinned_manifest=str(inside)))
    assert msg == f"{inside}: pin: the pin manifest is inside the model directory it pins"


def test_pinned_inline(tmp_path):
    import hashlib
    m = make_model(tmp_path / "m", {"a.bin": b"abc"})
    good = {"a.bin": "sha256:" + hashlib.sha256(b"abc").hexdigest()}
    with verify_model("m", str(m), policy(tmp_path, require_signature=False, pinned_files=good), None, None) as vm:
        assert list(vm.files) == ["a.bin"]
    bad = {"a.bin": "sha256:" + hashlib.sha256(b"abd").hexdigest()}
    msg, _ = refused(m, policy(tmp_path, require_signature=False, pinned_files=bad))
    assert msg == f"{m}/a.bin: digest: sha256 digest differs from the one in {WHERE}: pinned_files"


def test_absurdly_deep_nesting(tmp_path, keys):
    model = make_model(tmp_path / "m", {"a.bin": b"a"})
    deep = model
    for _ in range(65):
        deep = deep / "d"
    deep.mkdir(parents=True)
    for p in [model, *model.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (model / "model.sig").write_bytes(b"{}")  # storage is checked before the bundle is parsed
    (model / "model.sig").chmod(0o644)
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{model}/{'/'.join(['d'] * 65)}: storage: nested more than 64 directories deep"


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.update(mediaType="application/vnd.dev.sigstore.bundle+json;version=0.1"),
     "mediaType 'application/vnd.dev.sigstore.bundle+json;version=0.1' is not application/vnd.dev.sigstore.bundle.v0.3+json"),
    (lambda d: d["dsseEnvelope"]["signatures"].append(d["dsseEnvelope"]["signatures"][0]),
     "the DSSE envelope must carry exactly one signature"),
    (lambda d: d["dsseEnvelope"].update(payloadType="text/plain"),
     "payloadType 'text/plain' is not application/vnd.in-toto+json"),
    (lambda d: d["verificationMaterial"].update(x509CertificateChain={"certificates": []}),
     "verificationMaterial must hold exactly one of publicKey or x509CertificateChain"),
    (lambda d: d["dsseEnvelope"].update(payload="not base64!"), "payload is not valid base64"),
    (lambda d: d["verificationMaterial"].update(tlogEntries=[{"logIndex": "1"}]),
     "transparency-log or timestamp entries with a key or certificate chain: not supported"),
])
def test_malformed_bundles(tmp_path, model, keys, edit, reason):
    sign(model, keys["good"])
    sig = model / "model.sig"
    doc = json.loads(sig.read_text())
    edit(doc)
    sig.write_text(json.dumps(doc))
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{sig}: bundle: {reason}"


def test_signature_file_that_is_a_symlink_or_fifo(tmp_path, model, keys):
    sign(model, keys["good"])
    sig = model / "model.sig"
    real_sig = tmp_path / "elsewhere.sig"
    sig.rename(real_sig)
    sig.symlink_to(real_sig)
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{sig}: storage: a symlink (refused)"
    sig.unlink()
    os.mkfifo(sig, 0o644)
    msg, _ = refused(model, policy(tmp_path, public_keys=[str(keys["good_pub"])]))
    assert msg == f"{sig}: storage: a FIFO, not a regular file"


def test_clock_skew_allowance(tmp_path, model, keys):
    import datetime
    from cryptography import x509
    pki = keys["pki"]
    cert_sign(model, pki, leaf=pki.expired_leaf)
    expiry = x509.load_pem_x509_certificate(pki.expired_leaf.read_bytes()).not_valid_after_utc
    pol = cert_policy(tmp_path, pki)
    # Within the 300 s allowance: accepted; the chain is built at the leaf's last valid instant.
    with verify_model("m", str(model), pol, None, None, now=expiry + datetime.timedelta(seconds=290)) as vm:
        assert vm.signer == f"email:{pki.email}"
    late = expiry + datetime.timedelta(seconds=310)
    with pytest.raises(VerificationError) as info:
        verify_model("m", str(model), pol, None, None, now=late)
    assert str(info.value) == (f"{model}/model.sig: certificate: the signing certificate expired at {expiry.isoformat()} "
                               f"(now {late.replace(microsecond=0).isoformat()}, clock skew allowed 300s)")
    early = x509.load_pem_x509_certificate(pki.expired_leaf.read_bytes()).not_valid_before_utc - datetime.timedelta(seconds=310)
    with pytest.raises(VerificationError) as info:
        verify_model("m", str(model), pol, None, None, now=early)
    assert str(info.value).startswith(f"{model}/model.sig: certificate: the signing certificate is not valid before ")
