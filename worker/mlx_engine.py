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
import time
from typing import Mapping

import numpy as np

from .engine import Engine, InferenceError, ModelError, TensorSpec, announce
from .formats import gguf, mlxfn, safetensors

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
    warm_imports = ("mlx.core",)   # what a warm-pool worker imports before its model arrives

    def __init__(self, fn, weights: dict, inputs, outputs, function_name: str | None = None):
        self._fn, self._weights = fn, weights
        self.inputs, self.outputs = inputs, outputs
        self._function_name = function_name   # the .mlxfn, if the model is one

    @classmethod
    def load(cls, files: Mapping[str, str]) -> "MlxEngine":
        import mlx.core as mx

        started = time.perf_counter()
        meta = _read_metadata(files)
        inputs = tuple(TensorSpec.from_json(t, f"{METADATA}: inputs") for t in meta.get("inputs", []))
        outputs = tuple(TensorSpec.from_json(t, f"{METADATA}: outputs") for t in meta.get("outputs", []))
        if not inputs or not outputs:
            raise ModelError(f"{METADATA}: 'inputs' and 'outputs' must each list at least one tensor")
        timing: dict[str, float] = {}
        weights = _load_weights(files, meta, timing) if "weights" in meta else {}
        if "function" in meta:
            path = _file(files, meta, "function", (".mlxfn",))
            announce(f"parsing {meta['function']} (the version field)")
            mlxfn.check_file(path, meta["function"], mx.__version__)
            announce(f"parsing {meta['function']} (the function's graph: arity, primitives, references, depth)")
            by_name = {numpy_name: datatype for _, datatype, numpy_name in mlxfn.DTYPES.values()}
            keywords = {k: (v.ndim, by_name.get(str(v.dtype).rsplit(".", 1)[-1], str(v.dtype)))
                        for k, v in weights.items()}
            mlxfn.check_graph(path, meta["function"], inputs, outputs, keywords)
            announce(f"parsing {meta['function']} (an MLX exported function, with mx.import_function)")
            try:
                imported = mx.import_function(path)
            except Exception as exc:  # MLX raises ValueError, RuntimeError, IndexError, MemoryError on bad files
                raise ModelError(f"{meta['function']}: not an MLX exported function ({_first_line(exc)})") from None

            def fn(*args):
                return imported(*args, **weights)
        elif "architecture" in meta:
            arch = meta["architecture"]
            if not isinstance(arch, dict) or arch.get("type") != "mlp":
                raise ModelError(f"{METADATA}: architecture must be {{\"type\": \"mlp\", ...}} (the built-in one)")
            fn = _mlp(weights, arch.get("activation", "relu"))
        else:
            raise ModelError(f"{METADATA}: needs 'function' (an .mlxfn) or 'architecture'")
        engine = cls(fn, weights, inputs, outputs, meta.get("function"))
        deserialized = time.perf_counter()
        engine.warm_up()
        engine.load_phases = {"deserialize_s": deserialized - started, "warmup_s": time.perf_counter() - deserialized,
                              **timing}
        return engine

    def warm_up(self) -> None:
        """Calls on zeros while loading: a function that crashes, hangs or returns the wrong outputs fails
        the load, not the first client's request. With a variable (-1) dimension an exported function is
        called at two sizes, so one exported for fixed shapes (without shapeless=True) is refused here.
        The built-in architecture is this module's own code, shapeless by construction: it is called
        once on an empty batch (every variable dimension 0), which checks through MLX that the declared
        inputs fit the first layer and that the outputs have the declared type, without reading the
        weights (a call at batch 2 read every weight: 0.17-0.4 s for 1 GiB, measured in bench_load).

        The variable sizes are 2 and 3, never 1 (WARM_UP_SIZES): MLX 0.32.4 itself crashes (SIGSEGV, in
        plain MLX in-process too) when a shapeless export reduces over a variable axis that is 1 long,
        e.g. `mx.sum(x, axis=0, keepdims=True)` called with x of shape (1, 4): the replayed Reduce
        primitive reaches the CPU kernel, whose get_reduction_plan drops the size-1 axes and then reads
        strides.back() of an empty vector (mlx/backend/common/reduce.cpp). Outside an export, mx.sum
        treats that reduction as a no-op and never calls the kernel. Warming up at 1 made such valid
        exports fail to load; at 2 and 3 they load and serve exactly what plain MLX computes."""
        variable = any(d == -1 for t in self.inputs for d in t.shape)
        # The second size refuses fixed-shape exports; the built-in architecture needs no second size.
        sizes = (WARM_UP_SIZES if self._function_name else (0,)) if variable else (1,)
        for size in sizes:
            shapes = {t.name: [size if d == -1 else d for d in t.shape] for t in self.inputs}
            what = self._function_name or "the built-in architecture"
            call = ", ".join(f"'{k}' {v}" for k, v in shapes.items())
            announce(f"warm-up call of {what} with {call}")
            zeros = {t.name: np.zeros(shapes[t.name], dtype=t.numpy_dtype) for t in self.inputs}
            try:
                results = self.infer(zeros)
            except InferenceError as exc:
                declared = ", ".join(f"'{t.name}' {list(t.shape)}" for t in self.inputs)
                if self._function_name and _NO_MATCH in str(exc.__cause__):
                    raise ModelError(
                        f"{self._function_name}: the function accepts only the shapes it was exported with, "
                        f"but {METADATA} declares a variable dimension ({declared}) and a call with {call} "
                        "finds no match: export it with shapeless=True") from None
                raise ModelError(f"warm-up call with {call} failed: {exc}") from None
            for spec in self.outputs:  # ModelMetadata must tell the truth
                got = results[spec.name]
                if got.dtype != spec.numpy_dtype or got.ndim != len(spec.shape):
                    raise ModelError(f"{METADATA}: output '{spec.name}' is declared {spec.datatype} "
                                     f"{list(spec.shape)} but the model returns {got.dtype} with {got.ndim} "
                                     "dimensions")

    def keep_freed_buffers(self, max_bytes: int) -> None:
        """MLX's CPU allocator keeps freed buffers for reuse up to its cache limit, 32 MiB by default;
        a larger one goes back to glibc, which unmaps it, and the next call's array of that size pays
        every page fault again: a 64 MiB input took 58 ms to become an array, 8 ms into a reused
        buffer (echo model, in-process). The cache counts against the worker's memory limit."""
        import mlx.core as mx
        mx.set_cache_limit(max_bytes)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import mlx.core as mx

        args = [mx.array(inputs[spec.name]) for spec in self.inputs]
        try:
            results = self._fn(*args)
            if isinstance(results, mx.array):
                results = [results]
            if len(results) != len(self.outputs):
                raise InferenceError(f"the model returned {len(results)} outputs, {METADATA} lists "
                                     f"{len(self.outputs)}")
            mx.eval(results)
        except (ValueError, RuntimeError) as exc:   # MLX's own errors: one clean line, never a traceback
            if _NO_MATCH in str(exc):
                raise InferenceError("the model's function has no variant for these input shapes") from exc
            raise InferenceError(f"the model's function failed: {_first_line(exc)}") from exc
        return {spec.name: np.array(r, copy=False) for spec, r in zip(self.outputs, results)}


# Sizes a variable (-1) dimension takes in an exported function's warm-up calls: two, to refuse
# fixed-shape exports, and not 1, which crashes MLX 0.32.4 in reductions over that dimension
# (MlxEngine.warm_up).
WARM_UP_SIZES = (2, 3)

# What mx.import_function's callable raises when no exported variant matches the arguments (MLX 0.32).
_NO_MATCH = "No imported function found which matches"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _load_weights(files: Mapping[str, str], meta: dict, timing: dict[str, float]) -> dict:
    """Check the weights file strictly, then load it with MLX from exactly the checked bytes, then check
    that MLX returned what the file declares. timing["read_s"]: reading the tensors (mx.eval)."""
    import mlx.core as mx

    name = meta["weights"]
    path = _file(files, meta, "weights", (".safetensors", ".gguf"))
    if name.endswith(".safetensors"):
        announce(f"parsing {name} (safetensors header)")
        header = safetensors.read_file(path, name)
        safetensors.check_for_mlx(header, name)
        announce(f"parsing {name} (safetensors, with mx.load)")
        try:
            # The path is a sealed memfd: MLX's lazy reads see exactly the verified, checked bytes.
            weights = mx.load(path, format="safetensors")
        except Exception as exc:  # noqa: BLE001 - whatever MLX raises, the file is refused with its name
            raise ModelError(f"{name}: MLX refused it after the strict check: {_first_line(exc)}") from None
        safetensors.check_loaded(header, weights, name)
    else:
        announce(f"parsing {name} (GGUF header and tensor infos)")
        header = gguf.read_file(path, name)
        gguf.check_for_mlx(header, name)
        path = _private_copy(path)
        announce(f"parsing {name} (GGUF, with mx.load)")
        try:
            # MLX's GGUF parser crashes on crafted files: it runs only after the strict check, and sandboxed.
            weights = mx.load(path, format="gguf")
        except Exception as exc:  # noqa: BLE001 - whatever MLX raises, the file is refused with its name
            raise ModelError(f"{name}: MLX refused it after the strict check: {_first_line(exc)}") from None
        gguf.check_loaded(header, weights, name)
    read = time.perf_counter()
    try:
        mx.eval(list(weights.values()))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{name}: reading the tensors failed: {_first_line(exc)}") from None
    timing["read_s"] = time.perf_counter() - read
    return weights
