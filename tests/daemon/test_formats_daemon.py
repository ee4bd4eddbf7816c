"""Malformed model files through a real daemon: each is refused at load with the file and the defect named,
never READY, while another model answers throughout."""
from __future__ import annotations

import json
import pathlib
import threading

import grpc
import numpy as np
import pytest

from tests.support.daemon import Daemon
from tests.support.pki import upstream_sign
from tests.support.formats import (GGUF_DAEMON_DEFECTS, GGUF_DEFECTS, SAFETENSORS_DAEMON_DEFECTS, SAFETENSORS_DEFECTS,
                             crashing_mlxfn_seeds, mlxfn_with_version, mutated_mlxfn)
from tests.support.models import reference

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
    demo_files = {name: (demo_model / name).read_bytes() for name in ("model.json", "weights.safetensors")}
    demo_meta = json.loads(demo_files.pop("model.json"))
    graph = (demo_model / "model.mlxfn").read_bytes()
    # Mutants the strict reader accepts (it refuses every one that crashes MLX's import: test_mlxfn_graph.py) and
    # on which MLX crashes all the same, in the warm-up calls: the reader does not re-infer shapes.
    crashing = [(f"mlxfn-crash{i}", mutated_mlxfn(graph, seed))
                for i, seed in enumerate(crashing_mlxfn_seeds(graph, 50_000, str(demo_model)))]
    for name, data in [("mlxfn-fixed-shapes", _fixed_shape_export()),
                       ("mlxfn-old-version", mlxfn_with_version(graph, b"0.31.0")), *crashing]:
        path = write_model(models_dir / name, demo_meta, {**demo_files, "model.mlxfn": data}, keys[0])
        models[name] = {"path": path, "load": False}
    daemon = Daemon(tmp_path_factory.mktemp("formats-daemon"), models, keys[1]).start()
    daemon.model_names = sorted(models)
    yield daemon
    daemon.stop()


def _fixed_shape_export() -> bytes:
    """The demo function exported WITHOUT shapeless=True (at batch 1), while model.json declares [-1, 4]."""
    import os
    import tempfile

    os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
    import mlx.core as mx
    from sealbox.client.demo_model import demo_function, demo_weights
    with tempfile.TemporaryDirectory() as tmp:
        weights = {k: mx.array(v) for k, v in demo_weights().items()}
        mx.export_function(f"{tmp}/f.mlxfn", demo_function, mx.zeros((1, 4)), **weights)
        return open(f"{tmp}/f.mlxfn", "rb").read()


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


def test_mlxfn_exported_for_fixed_shapes_is_refused_at_load(formats_daemon):
    assert_refused(formats_daemon, "mlxfn-fixed-shapes", REFUSED + (
        "model.mlxfn: the function accepts only the shapes it was exported with, but model.json declares a "
        "variable dimension ('x' [-1, 4]) and a call with 'x' [2, 4] finds no match: export it with shapeless=True"))


def test_mlxfn_of_an_unknown_version_is_refused(formats_daemon):
    assert_refused(formats_daemon, "mlxfn-old-version", REFUSED + (
        "model.mlxfn: written by MLX 0.31.0; this reader knows the layout of MLX 0.32.4 only"))


def test_a_crash_while_loading_names_the_file_and_does_not_blame_memory(formats_daemon):
    """MLX dies of a signal on some mutated graphs that pass the strict reader (found by crashing_mlxfn_seeds,
    in plain MLX): the reason says so, names the file and the step (the worker's last words: the import, or a
    warm-up call), and says nothing of memory unless the cgroup reported an OOM kill. Mutants that do not crash
    in the worker are refused cleanly, by name."""
    candidates = sorted(m for m in formats_daemon.model_names if m.startswith("mlxfn-crash"))
    assert candidates, "no mutated graph that the strict reader accepts crashed MLX in the search"
    steps = ["parsing model.mlxfn (an MLX exported function, with mx.import_function)",
             "warm-up call of model.mlxfn with 'x' [2, 4]", "warm-up call of model.mlxfn with 'x' [3, 4]"]
    crashed = []
    with Answering(formats_daemon), formats_daemon.client() as client:
        for model in candidates:
            with pytest.raises(grpc.RpcError):
                client.load(model)
            status = client.status(model)
            assert status.state == "UNAVAILABLE" and client.model_ready(model) is False
            if status.reason.startswith("worker killed by the OOM killer"):
                # a mutant that asks for gigabytes (plain MLX then dies of SIGSEGV, its allocation failing): the
                # cgroup reported the OOM kill, so memory is named, with the step
                assert status.reason in [f"worker killed by the OOM killer while loading (memory limit 2048 MiB): "
                                         f"{step}" for step in steps], status.reason
            elif status.reason.startswith("worker killed by"):
                # SIGSEGV; or glibc's abort on heap corruption, which seccomp may kill first (SIGSYS)
                assert status.reason in [f"worker killed by {sig} while loading: {step}" for step in steps
                                         for sig in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGSYS (seccomp violation)")]
                crashed.append(status.reason)
            else:
                # MLX's own refusal, or the engine's (a warm-up call that raised)
                assert status.reason.startswith("worker exited with code 3 (model refused by the engine) while "
                                                "loading: model refused: model.mlxfn: "), status.reason
    assert crashed, f"none of the mutants that crash plain MLX crashed the worker ({len(candidates)} tried)"
    assert not any("memory" in reason for reason in crashed)
