"""Malformed model files through a real daemon: each is refused at load with the file and the defect named,
never READY, while another model answers throughout."""
from __future__ import annotations

import json
import pathlib
import threading

import grpc
import numpy as np
import pytest

from conftest import Daemon, upstream_sign
from format_fixtures import GGUF_DAEMON_DEFECTS, GGUF_DEFECTS, SAFETENSORS_DAEMON_DEFECTS, SAFETENSORS_DEFECTS
from test_serving import reference

MLP_META = {"architecture": {"type": "mlp"}, "weights": "weights.safetensors",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}
REFUSED = "worker exited with code 3 (model refused by the engine) while loading: model refused: "


def write_model(directory: pathlib.Path, meta: dict, files: dict[str, bytes], key) -> pathlib.Path:
    directory.mkdir(parents=True)
    (directory / "model.json").write_text(json.dumps(meta))
    for name, data in files.items():
        (directory / name).write_bytes(data)
    upstream_sign(directory, key)
    return directory


@pytest.fixture(scope="module")
def formats_daemon(tmp_path_factory, demo_model, keys):
    models_dir = tmp_path_factory.mktemp("format-models")
    models = {"demo": {"path": demo_model}}
    for defect in SAFETENSORS_DAEMON_DEFECTS:
        path = write_model(models_dir / f"st-{defect}", MLP_META,
                           {"weights.safetensors": SAFETENSORS_DEFECTS[defect][0]}, keys[0])
        models[f"st-{defect}"] = {"path": path, "load": False}
    for defect in GGUF_DAEMON_DEFECTS:
        path = write_model(models_dir / f"gguf-{defect}", dict(MLP_META, weights="model.gguf"),
                           {"model.gguf": GGUF_DEFECTS[defect][0]}, keys[0])
        models[f"gguf-{defect}"] = {"path": path, "load": False}
    daemon = Daemon(tmp_path_factory.mktemp("formats-daemon"), models, keys[1]).start()
    yield daemon
    daemon.stop()


class Answering:
    """Calls the demo model in a loop on another thread for as long as the block runs; all calls must succeed."""

    def __init__(self, daemon):
        self.daemon, self.calls, self.failures = daemon, 0, []
        self.stop = threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        x = np.ones((2, 4), np.float32)
        with self.daemon.client() as client:
            while True:
                try:
                    np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], reference(x),
                                               rtol=1e-5, atol=1e-5)
                    self.calls += 1
                except Exception as exc:  # noqa: BLE001 - any failure fails the test
                    self.failures.append(repr(exc))
                if self.stop.wait(0.02):
                    return

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.failures, self.failures
        assert self.calls >= 1


def assert_refused(daemon, model: str, reason: str) -> None:
    with Answering(daemon), daemon.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.load(model)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        status = client.status(model)
        assert status.state == "UNAVAILABLE"
        assert status.reason == reason
        assert reason in err.value.details()
        assert client.model_ready(model) is False
        with pytest.raises(grpc.RpcError) as err:
            client.infer(model, {"x": np.ones((1, 4), np.float32)})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("defect", SAFETENSORS_DAEMON_DEFECTS)
def test_malformed_safetensors_is_refused_naming_the_defect(formats_daemon, defect):
    assert_refused(formats_daemon, f"st-{defect}",
                   REFUSED + "weights.safetensors: " + SAFETENSORS_DEFECTS[defect][1])


@pytest.mark.parametrize("defect", GGUF_DAEMON_DEFECTS)
def test_malformed_gguf_is_refused_naming_the_defect(formats_daemon, defect):
    assert_refused(formats_daemon, f"gguf-{defect}", REFUSED + "model.gguf: " + GGUF_DEFECTS[defect][1])
