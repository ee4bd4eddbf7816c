"""The verified bytes are the loaded bytes: changing the model on disk after verification changes nothing."""
from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest

from tests.support.models import worker_python, reference


def test_swap_after_verify_is_not_seen_by_the_worker(tmp_path, daemon_factory, demo_model, keys):
    model = tmp_path / "models" / "demo"
    shutil.copytree(demo_model, model)
    daemon = daemon_factory({"demo": {"path": model}}, keys[1]).start()
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    expected = reference(x)
    # Overwrite the weights in place (same size, same inode) after the daemon verified and loaded them.
    weights = model / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    data[header:] = np.full((len(data) - header) // 4, 100.0, np.float32).tobytes()
    with open(weights, "r+b") as f:
        f.write(data)
    with daemon.client() as client:
        np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
        # A restarted worker gets the same sealed copies, not the file on disk.
        old_worker = worker_python(daemon)
        old_worker.kill()
        old_worker.wait(timeout=10)
        import time
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:   # until a new worker serves
            try:
                if worker_python(daemon).pid != old_worker.pid and client.model_ready("demo"):
                    break
            except AssertionError:
                pass
            time.sleep(0.05)
        assert worker_python(daemon).pid != old_worker.pid
        np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
        # An explicit reload verifies again and refuses the changed file; the old copy keeps serving.
        with pytest.raises(grpc.RpcError) as err:
            client.load("demo")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == (f"model 'demo': verification refused: {weights}: digest: sha256 digest "
                                       f"differs from the one in {model / 'model.sig'}")
        assert client.model_ready("demo")
        np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
    refused = [e for e in daemon.audit_events() if e.get("verdict") == "refused"]
    assert refused and refused[-1]["model"] == "demo"


def test_other_models_keep_serving_while_one_fails_verification(tmp_path, daemon_factory, demo_model, keys):
    tampered = tmp_path / "models" / "tampered"
    shutil.copytree(demo_model, tampered)
    with open(tampered / "model.json", "a") as f:
        f.write(" ")   # one extra byte after signing
    daemon = daemon_factory({"demo": {"path": demo_model}, "tampered": {"path": tampered}}, keys[1]).start()
    x = np.ones((2, 4), np.float32)
    with daemon.client() as client:
        np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5, atol=1e-5)
        status = client.status("tampered")
        assert status.state == "UNAVAILABLE"
        assert status.reason == (f"verification refused: {tampered / 'model.json'}: digest: sha256 digest differs "
                                 f"from the one in {tampered / 'model.sig'}")
        assert client.model_ready("tampered") is False
        with pytest.raises(grpc.RpcError) as err:
            client.infer("tampered", {"x": x})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5, atol=1e-5)
    # Nothing of the tampered model ever reached a worker.
    loads = [e for e in daemon.audit_events() if e["event"] == "model_load"]
    assert [e["model"] for e in loads] == ["demo"]
