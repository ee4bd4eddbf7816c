"""Parity with plain MLX: valid shapeless exports of reductions (keepdims or not, over the variable axis or
not) load in a real sandboxed worker and serve exactly what the same .mlxfn computes in-process.

The cause of the old SIGSEGV at load: the worker's warm-up called the function at batch 1, and MLX 0.32.4
itself crashes on a shapeless replay that reduces over a variable axis of length 1 (plain MLX, in-process,
no sandbox: test_plain_mlx_crashes_at_batch_1_the_cause). The warm-up now uses batch sizes 2 and 3.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.support import PYTHON
from tests.support.daemon import Daemon
from tests.support.pki import upstream_sign

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")

# name -> (function source, output shape declared in model.json); inputs are x: FP32 [-1, 4].
EXPORTS = {
    "sum0k": ("lambda x: mx.sum(x, axis=0, keepdims=True)", [1, 4]),
    "sum0": ("lambda x: mx.sum(x, axis=0)", [4]),
    "mean0k": ("lambda x: mx.mean(x, axis=0, keepdims=True)", [1, 4]),
    "max0k": ("lambda x: mx.max(x, axis=0, keepdims=True)", [1, 4]),
    "min0": ("lambda x: mx.min(x, axis=0)", [4]),
    "prod0k": ("lambda x: mx.prod(x, axis=0, keepdims=True)", [1, 4]),
    "logsumexp0k": ("lambda x: mx.logsumexp(x, axis=0, keepdims=True)", [1, 4]),
    "sum1k": ("lambda x: mx.sum(x, axis=1, keepdims=True)", [-1, 1]),
    "mean1": ("lambda x: mx.mean(x, axis=1)", [-1]),
    "var1k": ("lambda x: mx.var(x, axis=-1, keepdims=True)", [-1, 1]),
}


def export(name: str, path: pathlib.Path) -> None:
    import mlx.core as mx
    fn = eval(EXPORTS[name][0], {"mx": mx})  # noqa: S307 - the test's own table
    mx.export_function(str(path), fn, mx.zeros((2, 4)), shapeless=True)


def in_process(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
    """The same file, imported and called by plain MLX in this process."""
    import mlx.core as mx
    (out,) = mx.import_function(str(path))(mx.array(x))
    return np.array(out)


@pytest.fixture(scope="module")
def parity_daemon(tmp_path_factory, keys):
    models_dir = tmp_path_factory.mktemp("parity-models")
    models = {}
    for name, (_src, out_shape) in EXPORTS.items():
        directory = models_dir / name
        directory.mkdir()
        export(name, directory / "model.mlxfn")
        (directory / "model.json").write_text(json.dumps({
            "function": "model.mlxfn",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": out_shape}]}))
        upstream_sign(directory, keys[0])
        models[name] = {"path": directory}
    daemon = Daemon(tmp_path_factory.mktemp("parity-daemon"), models, keys[1]).start()
    daemon.models_dir = models_dir
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_reduction_exports_serve_exactly_what_plain_mlx_computes(parity_daemon, name):
    rng = np.random.default_rng(12)
    path = parity_daemon.models_dir / name / "model.mlxfn"
    with parity_daemon.client() as client:
        status = client.status(name)
        assert status.state == "READY", status.reason
        for batch in (2, 3, 7):
            x = rng.standard_normal((batch, 4)).astype(np.float32)
            got = client.infer(name, {"x": x})["y"]
            want = in_process(path, x)
            assert got.dtype == want.dtype == np.float32
            np.testing.assert_array_equal(got, want)   # bit for bit, not approximately
    load = [e for e in parity_daemon.audit_events() if e["event"] == "model_load" and e["model"] == name]
    assert load and load[0]["verdict"] == "ready"


def test_plain_mlx_crashes_at_batch_1_the_cause(tmp_path):
    """The cause, shown without sealbox: MLX 0.32.4 in a plain process dies of SIGSEGV when the shapeless
    sum-over-axis-0 export is called at batch 1, and computes it at batch 2. When MLX fixes this, this test
    fails: the warm-up may then use batch 1 again (worker/mlx_engine.py, WARM_UP_SIZES)."""
    export("sum0k", tmp_path / "f.mlxfn")
    script = ("import sys, mlx.core as mx\n"
              "g = mx.import_function(sys.argv[1])\n"
              "mx.eval(g(mx.ones((int(sys.argv[2]), 4))))\n")
    env = dict(os.environ, MLX_DISABLE_COMPILE="1")
    ok = subprocess.run([PYTHON, "-c", script, str(tmp_path / "f.mlxfn"), "2"], env=env, capture_output=True)
    assert ok.returncode == 0, ok.stderr
    crash = subprocess.run([PYTHON, "-c", script, str(tmp_path / "f.mlxfn"), "1"], env=env, capture_output=True)
    assert crash.returncode == -signal.SIGSEGV
    assert sys.platform == "linux"
