"""A hostile or broken model costs only its own worker: crash, memory, hang. Everything else keeps serving."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.support.pki import upstream_sign
from tests.support.models import reference


def mlx_model(directory, meta: dict, weights: dict | None = None, function=None, example=None, gguf: bytes = b""):
    os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
    import mlx.core as mx
    directory.mkdir(parents=True)
    if function is not None:
        mx.export_function(str(directory / "model.mlxfn"), function, example, shapeless=True)
    if gguf:
        (directory / "model.gguf").write_bytes(gguf)
    (directory / "model.json").write_text(json.dumps(meta))
    return directory


def crafted_gguf(seed: int) -> bytes:
    """A valid MLP in GGUF, then four header bytes overwritten: MLX 0.32's parser crashes on most such files."""
    import mlx.core as mx
    rng = np.random.default_rng(0)
    weights = {"layers.0.weight": mx.array(rng.standard_normal((8, 4)).astype(np.float32)),
               "layers.0.bias": mx.zeros(8), "layers.1.weight": mx.array(rng.standard_normal((3, 8)).astype(np.float32)),
               "layers.1.bias": mx.zeros(3)}
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        mx.save_gguf(f"{tmp}/w.gguf", weights)
        data = bytearray(open(f"{tmp}/w.gguf", "rb").read())
    mutate = np.random.default_rng(seed)
    for _ in range(4):
        data[int(mutate.integers(8, 200))] = int(mutate.integers(0, 256))
    return bytes(data)


MLP_META = {"architecture": {"type": "mlp"}, "weights": "model.gguf",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}
CRASH_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGABRT")


def test_crafted_gguf_is_refused_before_mlx_parses_it(tmp_path, daemon_factory, demo_model, keys):
    """The mutants that crashed MLX 0.32's GGUF parser (SIGSEGV, SIGBUS, aborts) never reach it now: the strict
    reader refuses each with the file and the defect, or the mutation hit only a value and the model loads."""
    models = tmp_path / "models"
    for seed in range(12):
        model = mlx_model(models / f"gguf{seed}", MLP_META, gguf=crafted_gguf(seed))
        upstream_sign(model, keys[0])
    daemon = daemon_factory({"demo": {"path": demo_model},
                             **{f"gguf{seed}": {"path": models / f"gguf{seed}", "load": False} for seed in range(12)}},
                            keys[1]).start()
    x = np.ones((2, 4), np.float32)
    refused = 0
    with daemon.client() as client:
        import grpc
        for seed in range(12):
            try:
                client.load(f"gguf{seed}")
                assert client.model_ready(f"gguf{seed}")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                status = client.status(f"gguf{seed}")
                assert status.state == "UNAVAILABLE"
                assert status.reason.startswith("worker exited with code 3 (model refused by the engine) while "
                                                "loading: model refused: model.gguf: "), status.reason
                assert client.model_ready(f"gguf{seed}") is False
                refused += 1
            # Whatever the mutant did, the demo model still answers.
            np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5, atol=1e-5)
    assert refused >= 8, refused
    assert not any(sig in e.get("reason", "") for e in daemon.audit_events() for sig in CRASH_SIGNALS)
    assert daemon.proc.poll() is None


def _hog(x):
    import mlx.core as mx
    big = mx.ones((16384, 16384))      # 1 GiB of float32, far past a 256 MiB limit
    return x + mx.sum(big)


def _slow(x):
    import mlx.core as mx
    a = mx.ones((2048, 2048)) * mx.sum(x)
    for _ in range(200):                # ~3.4 TFLOP with the reference BLAS: minutes, not seconds
        a = a @ a
    return x + mx.sum(a)


SIMPLE_META = {"function": "model.mlxfn",
               "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}


def test_memory_hog_and_endless_load_are_killed_and_reported(tmp_path, daemon_factory, demo_model, keys):
    import mlx.core as mx
    hog = mlx_model(tmp_path / "models" / "hog", SIMPLE_META, function=_hog, example=mx.zeros((1, 4)))
    slow = mlx_model(tmp_path / "models" / "slow", SIMPLE_META, function=_slow, example=mx.zeros((1, 4)))
    for model in (hog, slow):
        upstream_sign(model, keys[0])
    daemon = daemon_factory({"demo": {"path": demo_model},
                             "hog": {"path": hog, "options": "memory_mb = 256"},
                             "slow": {"path": slow, "options": "load_timeout_s = 4"}}, keys[1]).start()
    x = np.ones((2, 4), np.float32)
    with daemon.client() as client:
        hog_status = client.status("hog")
        assert hog_status.state == "UNAVAILABLE"
        # The cgroup's OOM kill, named with the limit and what the worker was doing.
        assert hog_status.reason == ("worker killed by the OOM killer while loading (memory limit 256 MiB): "
                                     "warm-up call of model.mlxfn with 'x' [2, 4]"), hog_status.reason
        slow_status = client.status("slow")
        assert slow_status.state == "UNAVAILABLE"
        assert slow_status.reason == "load timed out after 4 s; worker killed"
        np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5, atol=1e-5)
    events = {e["model"]: e for e in daemon.audit_events() if e["event"] == "model_load"}
    assert events["hog"]["verdict"] == "failed" and events["slow"]["verdict"] == "failed"
    assert events["demo"]["verdict"] == "ready"


def _quadratic(x):
    g = x @ x.T                          # batch x batch: cheap at batch 1, minutes at batch 4096
    for _ in range(8):
        g = g @ g / 4
    return g @ x


def test_inference_over_its_timeout_kills_the_worker_which_comes_back(tmp_path, daemon_factory, keys):
    import grpc
    import mlx.core as mx
    model = mlx_model(tmp_path / "models" / "quad", SIMPLE_META, function=_quadratic, example=mx.zeros((2, 4)))
    upstream_sign(model, keys[0])
    daemon = daemon_factory({"quad": {"path": model, "options": "infer_timeout_s = 2"}}, keys[1]).start()
    small = np.full((1, 4), 0.5, np.float32)
    with daemon.client() as client:
        expected = client.infer("quad", {"x": small})["y"]
        with pytest.raises(grpc.RpcError) as err:
            client.infer("quad", {"x": np.ones((4096, 4), np.float32)})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "model 'quad' is unavailable: inference timed out after 2 s; worker killed"
        import time
        deadline = time.monotonic() + 30
        while True:   # UNAVAILABLE until the restarted worker serves again
            try:
                result = client.infer("quad", {"x": small})["y"]
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert time.monotonic() < deadline, "the model did not come back"
                time.sleep(0.05)
        np.testing.assert_allclose(result, expected, rtol=1e-6)
    events = [e["event"] for e in daemon.audit_events()]
    assert "infer_timeout" in events and "worker_died" in events


def test_builtin_mlp_from_safetensors_serves(tmp_path, daemon_factory, keys):
    """A safetensors-only model whose metadata names the built-in MLP (the positive twin of the GGUF crash)."""
    import mlx.core as mx
    rng = np.random.default_rng(4)
    weights = {"layers.0.weight": rng.standard_normal((16, 4)).astype(np.float32),
               "layers.0.bias": rng.standard_normal(16).astype(np.float32),
               "layers.1.weight": rng.standard_normal((3, 16)).astype(np.float32),
               "layers.1.bias": rng.standard_normal(3).astype(np.float32)}
    model = mlx_model(tmp_path / "models" / "mlp", dict(MLP_META, weights="weights.safetensors",
                                                       architecture={"type": "mlp", "activation": "tanh"}))
    mx.save_safetensors(str(model / "weights.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    upstream_sign(model, keys[0])
    daemon = daemon_factory({"mlp": {"path": model}}, keys[1]).start()
    x = rng.standard_normal((7, 4)).astype(np.float32)
    hidden = np.tanh(x @ weights["layers.0.weight"].T + weights["layers.0.bias"])
    expected = hidden @ weights["layers.1.weight"].T + weights["layers.1.bias"]
    with daemon.client() as client:
        np.testing.assert_allclose(client.infer("mlp", {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


def test_a_stopped_then_continued_worker_serves_on(tmp_path, daemon_factory, demo_model, keys):
    """SIGSTOP/SIGCONT (a debugger, a job-control stop, a freezer) resumes sleeping syscalls through
    restart_syscall: the seccomp allowlist must let the worker live through it."""
    import signal
    import time

    import psutil
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1]).start()
    x = np.full((1, 4), 0.25, np.float32)
    with daemon.client() as client:
        expected = client.infer("demo", {"x": x})
        workers = [psutil.Process(pid) for pid in daemon.worker_pids()]
        assert workers
        for _ in range(3):
            for p in workers:
                p.send_signal(signal.SIGSTOP)
            time.sleep(0.5)
            for p in workers:
                p.send_signal(signal.SIGCONT)
            time.sleep(0.5)
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)
        got = client.infer("demo", {"x": x})
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
    assert sorted(daemon.worker_pids()) == sorted(p.pid for p in workers)
    assert "worker_died" not in [e["event"] for e in daemon.audit_events()]
