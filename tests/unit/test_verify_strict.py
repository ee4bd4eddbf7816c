"""Verification robustness: bounded JSON, no exception escaping as anything but a
refusal, bare e-mail identity pins, the legacy format refused by its predicate,
operator ignore paths, and rollback protection for models signed without a
release statement. Real signatures (the upstream tool or our publisher), real
refusals with their exact messages, no fd leaked, every refusal audited."""
from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from tests.support.pki import (PKI, SHARED, make_model, needs_shared, open_fds, run, sealbox_cli, upstream,
                               upstream_sign, write_key)

from sealbox.daemon.audit import AuditLog
from sealbox.daemon.config import ConfigError, policy_from_toml
from sealbox.trust import TrustPolicy, VerificationError, verify_model
from sealbox.trust._oms import MAX_JSON_BYTES, MAX_JSON_DEPTH, strict_json

WHERE = "/etc/sealbox/sealbox.toml: [models.m.policy]"
DEEP = 100_000
TOO_DEEP = f"not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)"
LEGACY = ("the legacy pre-1.0 model_signing format (predicate https://model_signing/Digests/v0.1): "
          "not supported; re-sign with model_signing >= 1.0")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    key, pub = write_key(d / "signer.pem")
    return {"key": key, "pub": pub, "pki": PKI(d / "pki")}


def policy(tmp_path: Path, **table) -> TrustPolicy:
    table.setdefault("sources", [str(tmp_path)])
    return policy_from_toml(table, WHERE)


def refused(model: Path, pol: TrustPolicy, state_dir=None, name="m") -> tuple[VerificationError, dict]:
    """verify_model expecting a refusal: no fd leaked, the refusal audited with its reason."""
    log = model.parent / f"audit-{os.getpid()}.jsonl"
    audit = AuditLog(str(log))
    before = open_fds()
    with pytest.raises(VerificationError) as info:
        verify_model(name, str(model), pol, state_dir, audit)
    assert open_fds() == before, "a refusal leaked file descriptors"
    audit.close()
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["event"] == "model_verify" and record["verdict"] == "refused"
    assert record["reason"] == str(info.value) and record["check"] == info.value.check
    return info.value, record


def nested(depth: int = DEEP) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


# ---- bounded JSON ----------------------------------------------------------------------


def test_deeply_nested_signature_file_cli_refuses_cleanly(tmp_path, keys):
    model = make_model(tmp_path / "m")
    sig = model / "model.sig"
    sig.write_bytes(nested())
    r = sealbox_cli("verify", model, "--signature", sig, "--public-key", keys["pub"])
    assert r.returncode == 1
    assert r.stderr == f"sealbox verify: refused: {sig}: bundle: {TOO_DEEP}\n"
    assert "Traceback" not in r.stderr and r.stdout == ""
    # Arrays too, and through the library with the refusal audited.
    sig.write_bytes(b"[" * DEEP + b"]" * DEEP)
    err, record = refused(model, policy(tmp_path, public_keys=[str(keys["pub"])]))
    assert str(err) == f"{sig}: bundle: {TOO_DEEP}" and record["check"] == "bundle"


def test_deeply_nested_statement_refused_before_its_signature(tmp_path, keys):
    # A well-formed bundle whose DSSE payload nests 100k deep: the bounded parser refuses it.
    model = make_model(tmp_path / "m")
    sig = model / "model.sig"
    bundle = {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
              "verificationMaterial": {"publicKey": {"hint": "00"}},
              "dsseEnvelope": {"payload": base64.b64encode(nested()).decode(), "payloadType": "application/vnd.in-toto+json",
                               "signatures": [{"sig": base64.b64encode(b"x").decode(), "keyid": ""}]}}
    sig.write_text(json.dumps(bundle))
    err, _ = refused(model, policy(tmp_path, public_keys=[str(keys["pub"])]))
    assert str(err) == f"{sig}: statement: {TOO_DEEP}"


def test_deeply_nested_release_statement_and_state_file(tmp_path, keys):
    model = make_model(tmp_path / "m")
    upstream_sign(model, keys["key"])
    pol = policy(tmp_path, public_keys=[str(keys["pub"])])
    (model / "model.release.sig").write_bytes(nested())
    err, _ = refused(model, pol)
    assert str(err) == f"{model}/model.release.sig: bundle: {TOO_DEEP}"
    (model / "model.release.sig").unlink()
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "versions.json").write_bytes(nested())
    err, _ = refused(model, pol, str(state))
    assert str(err) == f"{state}/versions.json: rollback: {TOO_DEEP}"


def test_json_bounds_at_the_limits():
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert strict_json(ok, "f", "bundle") is not None
    with pytest.raises(VerificationError) as info:
        strict_json(b"[" + ok + b"]", "f", "bundle")
    assert str(info.value) == f"f: bundle: {TOO_DEEP}"
    # Brackets inside strings (escaped quotes included) do not count.
    assert strict_json(json.dumps({"s": '\\"' + "[{" * 10_000}).encode(), "f", "bundle")["s"].endswith("[{")
    with pytest.raises(VerificationError) as info:
        strict_json(b" " * (MAX_JSON_BYTES + 1), "f", "release")
    assert str(info.value) == f"f: release: not valid JSON ({MAX_JSON_BYTES + 1} bytes, more than the {MAX_JSON_BYTES} allowed)"


def test_an_unexpected_exception_is_a_refusal_with_a_reason(tmp_path, keys, monkeypatch):
    from sealbox.trust import verifying
    model = make_model(tmp_path / "m")
    upstream_sign(model, keys["key"])

    def broken(*args, **kwargs):
        raise RuntimeError("hashing broke")
    monkeypatch.setattr(verifying, "hash_into_memfds", broken)
    err, record = refused(model, policy(tmp_path, public_keys=[str(keys["pub"])]))
    assert str(err) == f"{model}: internal: verification failed: RuntimeError('hashing broke')"
    assert record["reason"] == str(err) and record["check"] == "internal"


# ---- bare e-mail identity pins -------------------------------------------------------


def test_bare_email_identity_pin(tmp_path, keys):
    pki = keys["pki"]
    model = make_model(tmp_path / "m")
    upstream("sign", "certificate", model, "--private_key", pki.leaf_key, "--signing_certificate", pki.leaf,
             "--certificate_chain", pki.inter, "--signature", model / "model.sig")
    sig = model / "model.sig"
    r = sealbox_cli("verify", model, "--signature", sig, "--certificate-chain", pki.root, "--identity", pki.email)
    assert r.returncode == 0, r.stderr
    assert f"signer email:{pki.email}" in r.stdout and r.stderr == ""
    r = sealbox_cli("verify", model, "--signature", sig, "--certificate-chain", pki.root, "--identity", "mallory@example.com")
    assert r.returncode == 1
    assert r.stderr == (f"sealbox verify: refused: {sig}: identity: signer email:{pki.email}, subject:CN=signer is not "
                        f"among the identities pinned for {pki.root} (email:mallory@example.com)\n")
    r = sealbox_cli("verify", model, "--signature", sig, "--certificate-chain", pki.root, "--identity", "alice")
    assert r.returncode == 2
    assert r.stderr == ("sealbox verify: 'alice' must be email:ADDRESS (or a bare e-mail address), uri:URI "
                        "or subject:RFC4514-NAME\n")
    # The daemon's policy takes the same bare address.
    pol = policy(tmp_path, certificates=[{"roots": str(pki.root), "identities": [pki.email]}])
    assert pol.certificates[0].identities == (f"email:{pki.email}",)
    with verify_model("m", str(model), pol, None, None) as vm:
        assert vm.signer == f"email:{pki.email}"


# ---- the legacy pre-1.0 format --------------------------------------------------------

VECTORS = SHARED / "interop" / "model-transparency-test-vectors.json"


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    d = tmp_path_factory.mktemp("vectors")
    doc = json.loads(VECTORS.read_text())
    for name, b64 in doc["files"].items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(base64.b64decode(b64))
        p.chmod(0o644)
    return d, doc["vectors"]


@needs_shared()
def test_legacy_format_refused_by_its_predicate(vectors):
    d, _ = vectors
    model, sig = d / "v0.2.0-certificate", d / "v0.2.0-certificate" / "model.sig"
    r = sealbox_cli("verify", model, "--signature", sig, "--certificate-chain", d / "keys/certificate/ca-cert.pem",
                    "--identity", "subject:CN=intermediate-ca")
    assert r.returncode == 1
    assert r.stderr == f"sealbox verify: refused: {sig}: format: {LEGACY}\n"
    # Before any signature check: no trusted key or root matters.
    _, unrelated = write_key(d / "unrelated.pem")
    pol = policy_from_toml({"sources": [str(d)], "signature": str(sig), "public_keys": [str(unrelated)]}, WHERE)
    err, record = refused(model, pol)
    assert str(err) == f"{sig}: format: {LEGACY}" and "signer" not in record


# ---- operator ignore paths ------------------------------------------------------------


@needs_shared()
@pytest.mark.parametrize("name", ["v1.0.1-elliptic-key", "v1.1.0-elliptic-key", "v1.0.1-certificate", "v1.1.0-certificate"])
def test_upstream_vectors_with_ignore_paths_cli(vectors, name):
    d, vecs = vectors
    model, sig = d / name, d / name / "model.sig"
    vw = vecs[name]["verify_with"]
    trust = (["--public-key", d / vw["public_key"]] if vw["method"] == "key" else
             ["--certificate-chain", d / vw["certificate_chain"][0], "--identity", "subject:CN=intermediate-ca"])
    r = sealbox_cli("verify", model, "--signature", sig, *trust)
    if name.startswith("v1.0."):
        # v1.0.x signatures record no ignore paths: without the operator's, the extra file is refused.
        assert r.returncode == 1
        assert r.stderr == f"sealbox verify: refused: {model}/ignore-me: manifest: present but not signed\n"
    else:
        # v1.1 records them in the signed serialization: dropped without being told.
        assert r.returncode == 0 and r.stdout.endswith("; ignored (not verified): ignore-me\n"), r.stderr
    # As upstream's `model_signing verify --ignore-paths` takes it: a path from the current directory.
    code = "import sys; from sealbox.client import publisher; sys.exit(publisher.main(sys.argv[1:]))"
    r = run(sys.executable, "-c", code, "verify", name, "--signature", sig, *trust, "--ignore-paths", f"{name}/ignore-me",
            cwd=d, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("verified: 2 files, sha256:")
    assert r.stdout.endswith("; ignored (not verified): ignore-me\n")
    # ... or a name inside the model.
    r = sealbox_cli("verify", model, "--signature", sig, *trust, "--ignore-paths", "ignore-me")
    assert r.returncode == 0 and r.stdout.endswith("; ignored (not verified): ignore-me\n"), r.stderr


def test_ignored_files_are_not_handed_over_and_are_audited(tmp_path, keys):
    model = make_model(tmp_path / "m")
    upstream_sign(model, keys["key"])  # the signature records no ignore path for these
    (model / "notes").mkdir(mode=0o755)
    (model / "notes" / "a.txt").write_text("added after signing\n")
    (model / "README.md").write_text("also\n")
    for p in (model / "notes" / "a.txt", model / "README.md"):
        p.chmod(0o644)
    pol = policy(tmp_path, public_keys=[str(keys["pub"])], ignore_paths=["notes", "README.md"])
    log = tmp_path / "audit.jsonl"
    audit = AuditLog(str(log))
    with verify_model("m", str(model), pol, None, audit) as vm:
        assert sorted(vm.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]
        assert vm.ignored == ("README.md", "notes/a.txt")
        names = {os.readlink(f"/proc/self/fd/{fd}") for fd in vm.files.values()}
        assert names == {f"/memfd:sealbox:{n} (deleted)" for n in vm.files}
    audit.close()
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["verdict"] == "accepted" and record["ignored"] == ["README.md", "notes/a.txt"] and record["files"] == 3
    assert record["policy"].endswith("; ignore_paths=notes,README.md")


# ---- rollback protection without a release statement ----------------------------------


def upstream_model(tmp_path: Path, name: str, key: Path, marker: str) -> Path:
    model = make_model(tmp_path / name, {"config.json": b"{}", "weights.bin": os.urandom(2000),
                                         "CHANGELOG": marker.encode()})
    upstream_sign(model, key)
    return model


def digest_of(model: Path, pol: TrustPolicy) -> str:
    with verify_model("m", str(model), pol, None, None) as vm:
        return vm.digest


def test_rollback_with_an_operator_stated_version(tmp_path, keys):
    state = str(tmp_path / "state")
    old = upstream_model(tmp_path, "old", keys["key"], "1.0")
    new = upstream_model(tmp_path, "new", keys["key"], "2.0")

    def pol(version, **more):
        return policy(tmp_path, public_keys=[str(keys["pub"])], version=version, **more)
    new_digest, old_digest = digest_of(new, pol("2.0")), digest_of(old, pol("1.0"))
    # Without a release statement, min_version works against the stated version.
    with verify_model("m", str(new), pol("2.0", min_version="1.5"), state, None) as vm:
        assert vm.version == "2.0"
    assert json.loads((Path(state) / "versions.json").read_text()) == {"m": {"version": "2.0", "digest": new_digest}}
    # The older upstream-signed release, stated as what it is: refused.
    err, record = refused(old, pol("1.0"), state)
    assert str(err) == f"{old}: rollback: version 1.0 (stated in the policy) is lower than version 2.0 accepted before for 'm' (allow_downgrade is false)"
    assert record["version"] == "1.0" and record["version_stated"] is True
    # The older content put in place while the config still states 2.0: refused by its digest.
    err, _ = refused(old, pol("2.0"), state)
    assert str(err) == (f"{old}: rollback: version 2.0 (stated in the policy) was accepted before for 'm' with manifest "
                        f"digest {new_digest}, not {old_digest}: new content needs a higher version (allow_downgrade is false)")
    # min_version still applies to a stated version.
    err, _ = refused(old, pol("1.0", min_version="1.5", allow_downgrade=True), state)
    assert str(err) == f"{old}: rollback: version 1.0 (stated in the policy) is below the policy's min_version 1.5"
    # The same content restated, even lower, is the same content: accepted; the record stays.
    with verify_model("m", str(new), pol("1.9"), state, None) as vm:
        assert vm.version == "1.9"
    # Without a stated version, a recorded one still refuses.
    err, _ = refused(old, policy(tmp_path, public_keys=[str(keys["pub"])]), state)
    assert str(err) == f"{old}/model.release.sig: rollback: no signed release statement, but version 2.0 was accepted before"
    # A higher stated version for new content is recorded with its digest.
    with verify_model("m", str(old), pol("3.0"), state, None):
        pass
    assert json.loads((Path(state) / "versions.json").read_text()) == {"m": {"version": "3.0", "digest": old_digest}}


def test_manifest_digest_pin_and_stated_version_against_a_release(tmp_path, keys):
    model = upstream_model(tmp_path, "m", keys["key"], "x")
    digest = digest_of(model, policy(tmp_path, public_keys=[str(keys["pub"])]))
    with verify_model("m", str(model), policy(tmp_path, public_keys=[str(keys["pub"])], manifest_digest=digest), None, None):
        pass
    other = "sha256:" + "0" * 64
    err, record = refused(model, policy(tmp_path, public_keys=[str(keys["pub"])], manifest_digest=other))
    assert str(err) == f"{model}/model.sig: pin: manifest digest {digest} is not the manifest_digest {other} the policy pins"
    assert record["check"] == "pin"
    # A signed release statement and a stated version must agree.
    signed = make_model(tmp_path / "signed")
    assert sealbox_cli("sign", "key", signed, "--private-key", keys["key"], "--version", "1.4",
                       "--model-name", "m").returncode == 0
    err, _ = refused(signed, policy(tmp_path, public_keys=[str(keys["pub"])], version="1.5"))
    assert str(err) == f"{signed}/model.release.sig: rollback: the signed release says version 1.4, the policy states version 1.5"
    with verify_model("m", str(signed), policy(tmp_path, public_keys=[str(keys["pub"])], version="1.4.0"), None, None) as vm:
        assert vm.version == "1.4"


@pytest.mark.parametrize("table, message", [
    ({"version": "v2"}, "version: version 'v2' is not dot-separated decimal numbers such as 1.2.0"),
    ({"manifest_digest": "sha256:AB"}, "manifest_digest: 'sha256:AB' must be sha256: and 64 lowercase hex digits (what `sealbox verify` prints)"),
])
def test_rollback_keys_are_checked(tmp_path, keys, table, message):
    with pytest.raises(ConfigError) as info:
        policy(tmp_path, public_keys=[str(keys["pub"])], **table)
    assert str(info.value) == f"{WHERE}: {message}"


def test_rollback_keys_belong_to_one_model(tmp_path, keys):
    from sealbox.daemon.config import load_config
    config = tmp_path / "sealboxd.toml"
    config.write_text(f'[policy]\nsources = ["{tmp_path}"]\npublic_keys = ["{keys["pub"]}"]\nversion = "1.0"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(config))
    assert str(info.value) == (f"{config}: [policy]: version: belongs to one model: set it in "
                               "[models.NAME.policy], not in the default [policy]")
