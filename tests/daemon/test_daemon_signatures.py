"""The daemon loads what the upstream tool signed (certificate chains, shards) and refuses rollbacks."""
from __future__ import annotations

import os
import shutil

import grpc
import numpy as np
import pytest

from tests.support import PYTHON
from tests.support.models import reference
from tests.support.pki import PKI, run, sealbox_cli, upstream, upstream_sign

X = np.random.default_rng(11).standard_normal((4, 4)).astype(np.float32)


def unsigned_copy(demo_model, path):
    shutil.copytree(demo_model, path, ignore=shutil.ignore_patterns("model.sig", "model.release.sig"))
    return path


def test_certificate_chain_and_shards_signatures_from_upstream_load(tmp_path, daemon_factory, demo_model, keys):
    pki = PKI(tmp_path / "pki")
    models = tmp_path / "models"
    chained = unsigned_copy(demo_model, models / "chained")
    upstream("sign", "certificate", chained, "--private_key", pki.leaf_key, "--signing_certificate", pki.leaf,
             "--certificate_chain", pki.inter, "--signature", chained / "model.sig")
    sharded = unsigned_copy(demo_model, models / "sharded")
    code = ("import pathlib, sys; from model_signing import signing, hashing; m = pathlib.Path(sys.argv[1]);"
            "c = signing.Config().use_elliptic_key_signer(private_key=sys.argv[2]);"
            "c.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=512)"
            ".set_ignored_paths(paths=[m / 'model.sig']));"
            "c.sign(m, m / 'model.sig')")
    run(PYTHON, "-c", code, sharded, keys[0])
    cert_policy = (f'certificates = [{{ roots = "{pki.root}", identities = ["email:{pki.email}"] }}]')
    wrong_identity = (f'certificates = [{{ roots = "{pki.root}", identities = ["email:someone@else.example"] }}]\n'
                      'public_keys = []')
    wrong = unsigned_copy(chained, models / "wrong")
    shutil.copyfile(chained / "model.sig", wrong / "model.sig")
    daemon = daemon_factory({"chained": {"path": chained, "policy": cert_policy},
                             "sharded": {"path": sharded},
                             "wrong": {"path": wrong, "policy": wrong_identity}}, keys[1]).start()
    with daemon.client() as client:
        for name in ("chained", "sharded"):
            np.testing.assert_allclose(client.infer(name, {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
        status = client.status("wrong")
        assert status.state == "UNAVAILABLE"
        assert status.reason.startswith(f"verification refused: {wrong / 'model.sig'}: ")
        assert "email:publisher@example.com" in status.reason and "someone@else.example" in status.reason


def test_rollback_to_a_lower_signed_version_is_refused(tmp_path, daemon_factory, demo_model, keys):
    model = unsigned_copy(demo_model, tmp_path / "models" / "demo")
    assert sealbox_cli("sign", "key", model, "--private-key", keys[0], "--version", "2.1",
                       "--model-name", "demo").returncode == 0
    daemon = daemon_factory({"demo": {"path": model}}, keys[1]).start()
    with daemon.client() as client:
        assert client.status("demo").version == "2.1"
        # The publisher's older release, validly signed, put back in place.
        assert sealbox_cli("sign", "key", model, "--private-key", keys[0], "--version", "2.0",
                           "--model-name", "demo").returncode == 0
        with pytest.raises(grpc.RpcError) as err:
            client.load("demo")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == (f"model 'demo': verification refused: {model / 'model.release.sig'}: rollback: "
                                       "version 2.0 is lower than version 2.1 accepted before for 'demo' "
                                       "(allow_downgrade is false)")
        # The accepted version keeps serving.
        assert client.status("demo").version == "2.1"
        np.testing.assert_allclose(client.infer("demo", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
    # A restarted daemon remembers the highest version it accepted.
    daemon.stop()
    daemon.start()
    with daemon.client() as client:
        status = client.status("demo")
        assert status.state == "UNAVAILABLE" and "rollback" in status.reason


def test_a_signature_for_another_model_is_refused_when_the_name_is_bound(tmp_path, daemon_factory, demo_model, keys):
    # Signed by the upstream tool in a directory named `other`: its statement names "other".
    other = unsigned_copy(demo_model, tmp_path / "models" / "other")
    upstream_sign(other, keys[0])
    daemon = daemon_factory({"victim": {"path": other, "policy": 'model_name = "victim"'},
                             "unbound": {"path": other}}, keys[1]).start()
    refusal = f"{other / 'model.sig'}: name: signed for model 'other', but the policy's model_name is 'victim'"
    with daemon.client() as client:
        status = client.status("victim")
        assert status.state == "UNAVAILABLE" and status.reason == f"verification refused: {refusal}"
        assert client.model_ready("victim") is False
        with pytest.raises(grpc.RpcError) as err:
            client.infer("victim", {"x": X})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Without the key: today's behaviour, the signed name is not checked.
        assert client.model_ready("unbound")
        verdicts = [e for e in daemon.audit_events() if e["event"] == "model_verify" and e["model"] == "victim"]
        assert [(e["verdict"], e["check"], e["reason"]) for e in verdicts] == [("refused", "name", refusal)]
        assert not [e for e in daemon.audit_events()
                    if e["event"] == "model_load" and e["model"] == "victim" and e["verdict"] == "ready"]

        # Re-signed with `sealbox sign --model-name victim`: accepted under that name.
        assert sealbox_cli("sign", "key", other, "--private-key", keys[0], "--model-name", "victim").returncode == 0
        client.load("victim")
        assert client.model_ready("victim")
        np.testing.assert_allclose(client.infer("victim", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)


def test_the_source_walk_refuses_what_changed_above_the_model(tmp_path, daemon_factory, demo_model, keys):
    src = tmp_path / "src"
    paths = {}
    for name in ("good", "swapped", "groupw", "foreign"):
        paths[name] = unsigned_copy(demo_model, src / name / "m")
        upstream_sign(paths[name], keys[0])
        for d in (src, src / name):
            d.chmod(0o755)
    policy = f'sources = ["{src}"]'
    daemon = daemon_factory({name: {"path": path, "policy": policy} for name, path in paths.items()}, keys[1])
    # After the config is written: one directory above a model swapped for a symlink to a copy elsewhere,
    # one made group-writable, one given to another user.
    elsewhere = tmp_path / "elsewhere"
    (src / "swapped").rename(elsewhere)
    (src / "swapped").symlink_to(elsewhere)
    (src / "groupw").chmod(0o775)
    os.chown(src / "foreign", 65534, 65534)
    daemon.start()
    refusals = {
        "swapped": f"{src}/swapped: source: a symlink to '{elsewhere}'; below the source {src} no symlink is followed",
        "groupw": f"{src}/groupw: source: group- or world-writable (mode 0775)",
        "foreign": f"{src}/foreign: source: owned by uid 65534, not root or the daemon (uid 0)",
    }
    with daemon.client() as client:
        np.testing.assert_allclose(client.infer("good", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
        for name, refusal in refusals.items():
            status = client.status(name)
            assert status.state == "UNAVAILABLE" and status.reason == f"verification refused: {refusal}", name
            assert client.model_ready(name) is False
    events = daemon.audit_events()
    for name, refusal in refusals.items():
        verdicts = [(e["verdict"], e["check"], e["reason"]) for e in events
                    if e["event"] == "model_verify" and e["model"] == name]
        assert verdicts == [("refused", "source", refusal)]
    ready = {e["model"] for e in events if e["event"] == "model_load" and e["verdict"] == "ready"}
    assert ready == {"good"}
