"""The MLX engine in-process, loaded from sealed memfds as a worker gets them: the built-in architecture's
warm-up (one call on an empty batch, which reads no weight but still fails the load when the declared
inputs do not fit the first layer or the outputs are not what model.json declares), and the buffers it
keeps between calls."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support.models import build_mlp_model, sealed_files

SIDE = 512   # build_mlp_model(.., 1): one 512 x 512 FP32 layer


@pytest.fixture
def mlp(tmp_path):
    directory = tmp_path / "mlp"
    build_mlp_model(directory, 1)
    return directory


def declare(directory, **changes) -> None:
    path = directory / "model.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        meta[key] = value
    path.write_text(json.dumps(meta))


def test_the_built_in_architecture_warms_up_on_an_empty_batch_then_serves_exactly(mlp, capfd):
    import mlx.core as mx

    from sealbox.worker.mlx_engine import MlxEngine

    engine = MlxEngine.load(sealed_files(mlp))
    assert f"warm-up call of the built-in architecture with 'x' [0, {SIDE}]" in capfd.readouterr().err
    assert set(engine.load_phases) == {"deserialize_s", "warmup_s", "read_s"}
    weights = {k: np.array(v) for k, v in mx.load(str(mlp / "weights.safetensors")).items()}
    x = np.random.default_rng(1).standard_normal((3, SIDE)).astype(np.float32)
    got = engine.infer({"x": x})["y"]
    want = x @ weights["layers.0.weight"].T + weights["layers.0.bias"]
    assert got.shape == (3, SIDE) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_declared_input_the_first_layer_does_not_take_fails_the_load(mlp):
    from sealbox.worker.engine import ModelError
    from sealbox.worker.mlx_engine import MlxEngine

    declare(mlp, inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, SIDE - 1]}])
    with pytest.raises(ModelError) as refused:
        MlxEngine.load(sealed_files(mlp))
    assert str(refused.value).startswith(
        f"warm-up call with 'x' [0, {SIDE - 1}] failed: the model's function failed: [matmul] Last dimension of "
        f"first input with shape (0,{SIDE - 1}) must match")


@pytest.mark.parametrize("output, returned", [
    ({"datatype": "FP16", "shape": [-1, SIDE]}, "float32 with 2 dimensions"),
    ({"datatype": "FP32", "shape": [-1]}, "float32 with 2 dimensions"),
])
def test_an_output_other_than_declared_fails_the_load(mlp, output, returned):
    from sealbox.worker.engine import ModelError
    from sealbox.worker.mlx_engine import MlxEngine

    declare(mlp, outputs=[{"name": "y", **output}])
    with pytest.raises(ModelError) as refused:
        MlxEngine.load(sealed_files(mlp))
    assert str(refused.value) == (f"model.json: output 'y' is declared {output['datatype']} {output['shape']} "
                                  f"but the model returns {returned}")


def test_buffers_freed_by_a_call_are_kept_up_to_the_limit_given_and_reused(mlp):
    """A 24 MiB batch: its input array and its output do not fit MLX's default 32 MiB cache together,
    so without the limit raised one of them would go back to the kernel after every call."""
    import mlx.core as mx

    from sealbox.worker.mlx_engine import MlxEngine

    engine = MlxEngine.load(sealed_files(mlp))
    x = np.ones((12288, SIDE), np.float32)   # 24 MiB, and so is the output
    limit = 96 * 2**20
    engine.keep_freed_buffers(limit)
    try:
        engine.infer({"x": x})
        kept = mx.get_cache_memory()
        assert 2 * x.nbytes <= kept <= limit   # input and output both kept (the default keeps 32 MiB at most)
        engine.infer({"x": x})
        assert mx.get_cache_memory() == kept   # the second call took them and gave them back: none added
        engine.keep_freed_buffers(x.nbytes)
        engine.infer({"x": x})
        assert mx.get_cache_memory() <= x.nbytes
    finally:
        mx.set_cache_limit(32 * 2**20)   # MLX's default, for the other tests in this process
        mx.clear_cache()
