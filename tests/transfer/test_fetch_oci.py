"""Models as OCI artifacts in a real registry (Debian's docker-registry 2.8, TLS from a test CA),
pushed by the tests through the `oras` Python SDK, fetched by tag and by digest."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.support import RUN_ROOT
from tests.support.pki import make_model
from tests.support.registry import Registry

from sealbox.client import publisher as publisher_cli
from sealbox.daemon.config import policy_from_toml
from sealbox.sandbox.profile import SandboxProfile
from sealbox.transfer.fetch import fetch_model, store_policy
from sealbox.transfer.oci import OciTransport
from sealbox.transfer.sandboxed import SandboxedTransport
from sealbox.transfer.store import Store
from sealbox.trust import VerificationError, record_version, verify_model


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    server = Registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


def signed(d: Path, key, files=None, version=None) -> Path:
    make_model(d, files)
    extra = ["--version", version, "--model-name", "m"] if version else []
    assert publisher_cli.main(["sign", "key", str(d), "--private-key", str(key[0]), *extra]) == 0
    return d


def policy(registry, key):
    return policy_from_toml({"sources": [f"oci://{registry.host}/models/"], "public_keys": [str(key[1])]}, "t")


def fetch(registry, location, pol, state: Path, sandboxed=False):
    store = Store(str(state))
    if sandboxed:
        t = SandboxedTransport(location, pol.source_urls, SandboxProfile.for_fetch_helper(python=sys.executable),
                               os.path.join(RUN_ROOT, "fetch"), ca_bundle=str(registry.ca))
    else:
        t = OciTransport(location, pol.source_urls, ca_bundle=str(registry.ca))
    try:
        return fetch_model("m", location, pol, store, t, str(state)), store
    finally:
        t.close()


def test_by_tag_through_the_helper_and_by_digest(registry, key, tmp_path):
    model = signed(tmp_path / "m", key)
    digest = registry.push(model, "models/m:v1")
    pol = policy(registry, key)
    got, store = fetch(registry, f"oci://{registry.host}/models/m:v1", pol, tmp_path / "s1", sandboxed=True)
    assert got.peer.endswith(f"; manifest {digest}") and "commonName=127.0.0.1" in got.peer
    assert sorted(got.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]
    with verify_model("m", got.view, store_policy(pol, store), str(tmp_path / "s1"), None, store_links=True) as v:
        assert v.digest == got.signed.digest
        assert os.pread(v.files["weights/w1.bin"], 1 << 20, 0) == (model / "weights/w1.bin").read_bytes()
    by_digest, _ = fetch(registry, f"oci://{registry.host}/models/m@{digest}", pol, tmp_path / "s2")
    assert by_digest.files == got.files


def test_tag_moved_to_an_unsigned_artifact_refused(registry, key, tmp_path):
    model = signed(tmp_path / "m", key)
    registry.push(model, "models/moved:latest")
    registry.push(model, "models/moved:latest", skip=("model.sig",))   # same files, no signature
    location = f"oci://{registry.host}/models/moved:latest"
    with pytest.raises(VerificationError) as info:
        fetch(registry, location, policy(registry, key), tmp_path / "s")
    assert str(info.value) == f"{location}#model.sig: transfer: missing (the location has no signature)"
    assert os.listdir(tmp_path / "s/store/sha256") == []


def test_tag_moved_back_to_an_older_signed_artifact_refused_by_rollback(registry, key, tmp_path):
    v1, v2 = signed(tmp_path / "v1", key, version="1.0"), signed(tmp_path / "v2", key, version="2.0")
    location = f"oci://{registry.host}/models/rolled:latest"
    registry.push(v2, "models/rolled:latest")
    got, _ = fetch(registry, location, policy(registry, key), tmp_path / "s")
    record_version(str(tmp_path / "s"), "m", got.signed.version)   # the daemon records it once READY
    registry.push(v1, "models/rolled:latest")                       # validly signed, but older
    with pytest.raises(VerificationError) as info:
        fetch(registry, location, policy(registry, key), tmp_path / "s")
    assert info.value.check == "rollback" and str(info.value).startswith(f"{location}#model.release.sig: rollback: ")


def test_a_file_that_is_not_what_was_signed_refused(registry, key, tmp_path):
    model = signed(tmp_path / "m", key)
    (model / "weights/w0.bin").write_bytes(os.urandom(3000))
    registry.push(model, "models/tampered:v1")
    location = f"oci://{registry.host}/models/tampered:v1"
    with pytest.raises(VerificationError) as info:
        fetch(registry, location, policy(registry, key), tmp_path / "s")
    assert str(info.value) == f"{location}#weights/w0.bin: digest: sha256 digest differs from the signed one; not stored"


def test_detached_signature_found_through_the_fallback_tag(registry, key, tmp_path):
    model = signed(tmp_path / "m", key)
    digest = registry.push(model, "models/detached:v1", skip=("model.sig",))
    sig_dir = tmp_path / "sig"
    sig_dir.mkdir()
    (sig_dir / "model.sig").write_bytes((model / "model.sig").read_bytes())
    os.chmod(sig_dir / "model.sig", 0o644)
    # The signature as its own artifact whose subject is the model (what `oras attach` makes) ...
    sig_digest = registry.push(sig_dir, "models/detached:sig-upload")
    sig_manifest = json.loads(registry._http().request(
        "GET", f"https://{registry.host}/v2/models/detached/manifests/{sig_digest}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).data)
    model_manifest = registry._http().request(
        "GET", f"https://{registry.host}/v2/models/detached/manifests/{digest}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).data
    sig_manifest["subject"] = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest,
                               "size": len(model_manifest)}
    sig_manifest["artifactType"] = "application/vnd.dev.sigstore.bundle.v0.3+json"
    body = json.dumps(sig_manifest).encode()
    import hashlib
    attached = "sha256:" + hashlib.sha256(body).hexdigest()
    registry.put_manifest("models/detached", attached, body, "application/vnd.oci.image.manifest.v1+json")
    # ... listed under the referrers fallback tag (this registry has no referrers API).
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": attached,
                            "size": len(body), "artifactType": sig_manifest["artifactType"]}]}
    registry.put_manifest("models/detached", digest.replace(":", "-"), json.dumps(index).encode(),
                          "application/vnd.oci.image.index.v1+json")
    got, _ = fetch(registry, f"oci://{registry.host}/models/detached:v1", policy(registry, key), tmp_path / "s")
    assert sorted(got.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]


def test_outside_the_policy_refused_before_connecting(registry, key, tmp_path):
    location = f"oci://{registry.host}/other/m:v1"
    with pytest.raises(VerificationError) as info:
        fetch_model("m", location, policy(registry, key), Store(str(tmp_path / "s")), None, None)
    assert str(info.value) == (f"{location}: source: not under an allowed source URL "
                               f"(oci://{registry.host}/models/)")
