"""Against a real daemon: a signature nested 100k deep is a refusal with its reason (not UNKNOWN),
files under ignore_paths never reach the worker (audit event and the sealed fds it holds), and an
upstream-signed older release is refused under an operator-stated version."""
from __future__ import annotations

import os
import shutil

import grpc
import numpy as np
import pytest

from tests.support.models import reference
from tests.support.pki import upstream_sign

X = np.random.default_rng(12).standard_normal((4, 4)).astype(np.float32)
TOO_DEEP = "not valid JSON (nested deeper than 64 levels)"


def unsigned_copy(demo_model, path, **extra: bytes):
    shutil.copytree(demo_model, path, ignore=shutil.ignore_patterns("model.sig", "model.release.sig"))
    for name, data in extra.items():
        (path / name).write_bytes(data)
        (path / name).chmod(0o644)
    return path


def sealed_files_of(pids: list[int]) -> set[str]:
    """The sealbox memfds the worker's processes hold: /memfd:sealbox:NAME (deleted) -> NAME."""
    names = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith("/memfd:sealbox:"):
                names.add(target.removeprefix("/memfd:sealbox:").removesuffix(" (deleted)"))
    return names


def test_deeply_nested_signature_is_refused_with_its_reason(tmp_path, daemon_factory, demo_model, keys):
    model = unsigned_copy(demo_model, tmp_path / "models" / "nested")
    sig = model / "model.sig"
    sig.write_bytes(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    sig.chmod(0o644)
    daemon = daemon_factory({"nested": {"path": model}}, keys[1]).start()
    reason = f"verification refused: {sig}: bundle: {TOO_DEEP}"
    with daemon.client() as client:
        status = client.status("nested")
        assert (status.state, status.reason) == ("UNAVAILABLE", reason)
        with pytest.raises(grpc.RpcError) as err:
            client.load("nested")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == f"model 'nested': {reason}"
        assert client.status("nested").reason == reason
    assert daemon.worker_pids() == []  # nothing was handed to a worker
    verdicts = [e for e in daemon.audit_events() if e["event"] == "model_verify"]
    assert len(verdicts) == 2 and all(e["verdict"] == "refused" and e["check"] == "bundle"
                                      and e["reason"] == reason.removeprefix("verification refused: ") for e in verdicts)
    assert not [e for e in daemon.audit_events() if e["event"] == "model_load"]
    assert "Traceback" not in daemon.stderr_path.read_text()


def test_ignored_files_never_reach_the_worker(tmp_path, daemon_factory, demo_model, keys):
    model = unsigned_copy(demo_model, tmp_path / "models" / "demo")
    upstream_sign(model, keys[0])
    # Added after signing; the signature records no ignore path for it.
    (model / "NOTES.txt").write_text("not signed\n")
    (model / "NOTES.txt").chmod(0o644)
    strict = unsigned_copy(model, tmp_path / "models" / "strict", **{"NOTES.txt": b"not signed\n"})
    shutil.copyfile(model / "model.sig", strict / "model.sig")
    daemon = daemon_factory({"demo": {"path": model, "policy": 'ignore_paths = ["NOTES.txt"]'},
                             "strict": {"path": strict}}, keys[1]).start()
    with daemon.client() as client:
        np.testing.assert_allclose(client.infer("demo", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
        status = client.status("strict")
        assert status.state == "UNAVAILABLE"
        assert status.reason == f"verification refused: {strict / 'NOTES.txt'}: manifest: present but not signed"
    accepted = [e for e in daemon.audit_events() if e["event"] == "model_verify" and e["model"] == "demo"]
    assert len(accepted) == 1 and accepted[0]["verdict"] == "accepted"
    assert accepted[0]["ignored"] == ["NOTES.txt"] and accepted[0]["files"] == 3
    # What the worker holds: the sealed copies of exactly the signed files.
    assert sealed_files_of(daemon.worker_pids()) == {"model.json", "model.mlxfn", "weights.safetensors"}


def test_upstream_signed_older_release_refused_under_a_stated_version(tmp_path, daemon_factory, demo_model, keys):
    old = unsigned_copy(demo_model, tmp_path / "release-1.0", CHANGELOG=b"1.0\n")
    upstream_sign(old, keys[0])
    model = unsigned_copy(demo_model, tmp_path / "models" / "demo", CHANGELOG=b"2.0\n")
    upstream_sign(model, keys[0])
    daemon = daemon_factory({"demo": {"path": model, "policy": 'version = "2.0"'}}, keys[1]).start()
    with daemon.client() as client:
        assert client.status("demo").version == "2.0"
        new_digest = next(e["digest"] for e in daemon.audit_events() if e["event"] == "model_verify")
        # The older, validly upstream-signed release put in place; the config still states 2.0.
        for name in ("CHANGELOG", "model.sig"):
            shutil.copyfile(old / name, model / name)
        with pytest.raises(grpc.RpcError) as err:
            client.load("demo")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        old_digest = [e for e in daemon.audit_events() if e["event"] == "model_verify"][-1]["digest"]
        assert old_digest != new_digest
        assert err.value.details() == (
            f"model 'demo': verification refused: {model}: rollback: version 2.0 (stated in the policy) was accepted "
            f"before for 'demo' with manifest digest {new_digest}, not {old_digest}: new content needs a higher "
            "version (allow_downgrade is false)")
        # The accepted version keeps serving.
        assert client.status("demo").state == "READY"
        np.testing.assert_allclose(client.infer("demo", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
    # Stated as what it is, after a restart: still refused, the highest version is remembered.
    daemon.stop()
    daemon.config.write_text(daemon.config.read_text().replace('version = "2.0"', 'version = "1.0"'))
    daemon.start()
    with daemon.client() as client:
        status = client.status("demo")
        assert status.state == "UNAVAILABLE"
        assert status.reason == (f"verification refused: {model}: rollback: version 1.0 (stated in the policy) is lower "
                                 "than version 2.0 accepted before for 'demo' (allow_downgrade is false)")
    assert daemon.worker_pids() == []
