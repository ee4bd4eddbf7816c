"""The built-in demo model: a small MLP exported as a shapeless MLX function.

Written as `x @ W.T + b` (never nn.Linear: its addmm corrupts the heap in
shapeless exports on MLX 0.32.4); weights travel as keyword inputs in a
separate safetensors file, so the .mlxfn holds only the graph.
"""
from __future__ import annotations

import json
import os

import numpy as np

INPUT, OUTPUT = "x", "y"
SIZES = (4, 16, 3)


def demo_weights(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w0": rng.standard_normal((SIZES[1], SIZES[0])).astype(np.float32),
            "b0": rng.standard_normal(SIZES[1]).astype(np.float32),
            "w1": rng.standard_normal((SIZES[2], SIZES[1])).astype(np.float32),
            "b1": rng.standard_normal(SIZES[2]).astype(np.float32)}


def demo_function(x, w0, b0, w1, b1):
    """The model itself, usable with mlx arrays (for export) or numpy arrays (as a reference)."""
    hidden = x @ w0.T + b0
    hidden = hidden * (hidden > 0)
    return hidden @ w1.T + b1


def build_demo_model(path: str) -> str:
    """Write model.mlxfn, weights.safetensors and model.json into path (created 0755)."""
    os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
    import mlx.core as mx

    os.makedirs(path, mode=0o755, exist_ok=True)
    weights = {k: mx.array(v) for k, v in demo_weights().items()}
    fn_path = os.path.join(path, "model.mlxfn")
    if os.path.exists(fn_path):
        os.unlink(fn_path)  # export_function refuses to overwrite
    mx.export_function(fn_path, demo_function, mx.zeros((2, SIZES[0])), shapeless=True, **weights)
    mx.save_safetensors(os.path.join(path, "weights.safetensors"), weights)
    meta = {"function": "model.mlxfn", "weights": "weights.safetensors",
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, SIZES[0]]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, SIZES[2]]}]}
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), 0o644)
    return path
