"""The MLX engine: an exported MLX function (.mlxfn) or a built-in architecture.

A model directory holds `model.json` and either
  - `function` (an .mlxfn made with mx.export_function) plus optional
    `weights` (.safetensors or .gguf) whose tensors are passed as keyword arguments, or
  - `architecture` ({"type": "mlp", "activation": "relu"}) plus `weights`.
`inputs`/`outputs` list {name, datatype, shape} with -1 for variable sizes;
the function takes the inputs positionally, in that order, and returns the
outputs in order.
"""
from __future__ import annotations

import json
from typing import Mapping

import numpy as np

from sealbox.worker.engine import Engine, ModelError, TensorSpec

METADATA = "model.json"
MAX_METADATA_BYTES = 1 << 20


def _read_metadata(files: Mapping[str, str]) -> dict:
    if METADATA not in files:
        raise ModelError(f"{METADATA}: missing (the model directory must describe its inputs and outputs)")
    with open(files[METADATA], "rb") as f:
        raw = f.read(MAX_METADATA_BYTES + 1)
    if len(raw) > MAX_METADATA_BYTES:
        raise ModelError(f"{METADATA}: larger than {MAX_METADATA_BYTES} bytes")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"{METADATA}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{METADATA}: must be a JSON object")
    return meta


def _file(files: Mapping[str, str], meta: dict, key: str, suffixes: tuple[str, ...]) -> str:
    name = meta.get(key)
    if not isinstance(name, str) or not name.endswith(suffixes):
        raise ModelError(f"{METADATA}: '{key}' must name a {' or '.join(suffixes)} file of the model")
    if name not in files:
        raise ModelError(f"{METADATA}: '{key}' names {name!r}, which is not among the model's files")
    return files[name]


def _private_copy(path: str) -> str:
    """MLX's GGUF reader opens its file O_RDWR and maps it shared and writable, which a sealed memfd
    refuses. Give it a copy of the verified bytes that only this worker can see."""
    import os
    import shutil
    fd = os.memfd_create("gguf-copy")
    with open(path, "rb") as src, open(fd, "wb", closefd=False) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return f"/proc/self/fd/{fd}"


def _mlp(weights: dict, activation: str):
    """A multilayer perceptron over layers.N.weight / layers.N.bias, written as x @ W.T + b (no addmm)."""
    import mlx.core as mx

    acts = {"relu": lambda x: mx.maximum(x, 0), "tanh": mx.tanh, "sigmoid": mx.sigmoid, "identity": lambda x: x}
    if activation not in acts:
        raise ModelError(f"{METADATA}: architecture activation {activation!r} unknown (known: {sorted(acts)})")
    count = 0
    while f"layers.{count}.weight" in weights:
        count += 1
    expected = {f"layers.{i}.{p}" for i in range(count) for p in ("weight", "bias")}
    if count == 0 or set(weights) != expected:
        raise ModelError(f"weights: an mlp needs exactly layers.0..N .weight/.bias tensors, got {sorted(weights)}")
    layers = [(weights[f"layers.{i}.weight"], weights[f"layers.{i}.bias"]) for i in range(count)]
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2 or b.shape != (w.shape[0],) or (i and w.shape[1] != layers[i - 1][0].shape[0]):
            raise ModelError(f"weights: layer {i} shapes {w.shape}/{b.shape} do not chain")

    def forward(x):
        for i, (w, b) in enumerate(layers):
            x = x @ w.T + b
            if i < count - 1:
                x = acts[activation](x)
        return [x]
    return forward


class MlxEngine(Engine):
    platform = "mlx"

    def __init__(self, fn, weights: dict, inputs, outputs):
        self._fn, self._weights = fn, weights
        self.inputs, self.outputs = inputs, outputs

    @classmethod
    def load(cls, files: Mapping[str, str]) -> "MlxEngine":
        import mlx.core as mx

        meta = _read_metadata(files)
        inputs = tuple(TensorSpec.from_json(t, f"{METADATA}: inputs") for t in meta.get("inputs", []))
        outputs = tuple(TensorSpec.from_json(t, f"{METADATA}: outputs") for t in meta.get("outputs", []))
        if not inputs or not outputs:
            raise ModelError(f"{METADATA}: 'inputs' and 'outputs' must each list at least one tensor")
        weights = {}
        if "weights" in meta:
            path = _file(files, meta, "weights", (".safetensors", ".gguf"))
            fmt = meta["weights"].rsplit(".", 1)[1]
            if fmt == "gguf":
                path = _private_copy(path)
            try:
                # The path is a sealed memfd: MLX's lazy reads see exactly the verified bytes.
                # GGUF parsing is known to crash on crafted files: it happens only here, sandboxed.
                weights = mx.load(path, format=fmt)
                mx.eval(list(weights.values()))
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"{meta['weights']}: not loadable as {fmt} ({exc})") from None
        if "function" in meta:
            path = _file(files, meta, "function", (".mlxfn",))
            try:
                imported = mx.import_function(path)
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"{meta['function']}: not an MLX exported function ({exc})") from None

            def fn(*args):
                return imported(*args, **weights)
        elif "architecture" in meta:
            arch = meta["architecture"]
            if not isinstance(arch, dict) or arch.get("type") != "mlp":
                raise ModelError(f"{METADATA}: architecture must be {{\"type\": \"mlp\", ...}} (the built-in one)")
            fn = _mlp(weights, arch.get("activation", "relu"))
        else:
            raise ModelError(f"{METADATA}: needs 'function' (an .mlxfn) or 'architecture'")
        engine = cls(fn, weights, inputs, outputs)
        engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """One call on zeros (variable dimensions = 1) while loading: a function that crashes,
        hangs or returns the wrong outputs fails the load, not the first client's request."""
        zeros = {t.name: np.zeros([1 if d == -1 else d for d in t.shape], dtype=t.numpy_dtype)
                 for t in self.inputs}
        try:
            results = self.infer(zeros)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"warm-up call failed: {exc}") from None
        for spec in self.outputs:  # ModelMetadata must tell the truth
            got = results[spec.name]
            if got.dtype != spec.numpy_dtype or got.ndim != len(spec.shape):
                raise ModelError(f"{METADATA}: output '{spec.name}' is declared {spec.datatype} {list(spec.shape)} "
                                 f"but the model returns {got.dtype} with {got.ndim} dimensions")

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import mlx.core as mx

        args = [mx.array(inputs[spec.name]) for spec in self.inputs]
        results = self._fn(*args)
        if isinstance(results, mx.array):
            results = [results]
        if len(results) != len(self.outputs):
            raise RuntimeError(f"model returned {len(results)} outputs, metadata lists {len(self.outputs)}")
        mx.eval(results)
        return {spec.name: np.array(r, copy=False) for spec, r in zip(self.outputs, results)}
