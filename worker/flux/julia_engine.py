"""JuliaEngine: run a scanned Flux model in real Julia (BSON.load + Flux) through juliacall.

`BSON.load` can run code from the file, so the file goes through the same
allowlist scanner as the native engine first; only accepted files ever reach
Julia. Julia must already be installed with BSON, Flux and PythonCall in its
depot: juliacall runs with PYTHON_JULIAPKG_OFFLINE=yes and never downloads.
The executable is PYTHON_JULIAPKG_EXE or `julia` on PATH; without one, load()
refuses before juliacall is imported (importing it would try to download Julia).

Tensors use the native engine's layout (numpy axes = Julia axes reversed), so
both engines report the same TensorSpecs and take the same requests.
"""
from __future__ import annotations

import os
import shutil
import threading
from typing import Mapping

import numpy as np

from ..engine import Engine, InputError, ModelError
from .loading import INPUT_NAME, OUTPUT_NAME, scan_model, tensor_specs
from .records import Model
from .shapes import ShapeError, layer_shape

EXE_VARIABLE = "PYTHON_JULIAPKG_EXE"

# numpy (batch, ...) <-> Julia (..., batch): the same elements, axes reversed
_FORWARD = """
function (model, x)
    xj = permutedims(Array(x), ndims(x):-1:1)
    y = model(xj)
    return permutedims(Array(y), ndims(y):-1:1)
end
"""

_LOAD = "bytes -> BSON.load(IOBuffer(Vector{UInt8}(bytes)))"

_lock = threading.Lock()     # juliacall is not thread-safe; one Julia runtime per process
_julia = None


def find_julia() -> str:
    """The Julia executable juliacall should use; ModelError if there is none."""
    configured = os.environ.get(EXE_VARIABLE)
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise ModelError(f"engine julia requested but no Julia executable found at {configured} "
                         f"(from {EXE_VARIABLE})")
    found = shutil.which("julia")
    if found:
        return found
    raise ModelError("engine julia requested but no Julia executable found at "
                     f"${EXE_VARIABLE} (unset) or on PATH ({os.environ.get('PATH', '')})")


def _start(exe: str):
    """Import juliacall offline on `exe` and load BSON and Flux; returns juliacall's Main."""
    global _julia
    if _julia is None:
        os.environ["PYTHON_JULIAPKG_OFFLINE"] = "yes"
        os.environ[EXE_VARIABLE] = exe
        try:
            from juliacall import Main  # noqa: PLC0415 - only after the checks above
            Main.seval("import BSON, Flux")
        except Exception as err:      # juliacall reports Julia-side failures as its own types
            raise ModelError(f"engine julia: cannot start Julia at {exe} with BSON and Flux "
                             f"(offline): {type(err).__name__}: {err}") from None
        _julia = Main
    return _julia


class JuliaEngine(Engine):
    platform = "flux-julia"

    def __init__(self, name: str, model: Model, julia_model, forward):
        self.name = name
        self.model = model
        self.inputs, self.outputs = tensor_specs(model)
        self._julia_model = julia_model
        self._forward = forward

    @classmethod
    def load(cls, files: Mapping[str, str]) -> "JuliaEngine":
        name, data, model = scan_model(files)     # the scanner first, always
        exe = find_julia()
        with _lock:
            jl = _start(exe)
            try:
                # the very bytes that were scanned, not the file again (it could have changed)
                loaded = jl.seval(_LOAD)(np.frombuffer(data, np.uint8))
                julia_model = loaded[jl.Symbol(model.key)]
                forward = jl.seval(_FORWARD)
            except Exception as err:
                raise ModelError(f"{name}: BSON.load in Julia failed: {type(err).__name__}: {err}") from None
        return cls(name, model, julia_model, forward)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        x = np.ascontiguousarray(inputs[INPUT_NAME])
        # shape errors are found by the same rules as the native engine, before Julia sees them
        shape = x.shape
        try:
            for place, layer in self.model.layers:
                shape = layer_shape(layer, shape, place)
        except ShapeError as err:
            raise InputError(f"input '{INPUT_NAME}' of shape {list(x.shape)} does not fit "
                             f"the model: {err}") from None
        with _lock:
            y = np.array(self._forward(self._julia_model, x), dtype=self.model.dtype)
        if y.shape != shape:
            raise RuntimeError(f"{self.name}: Julia returned shape {y.shape}, expected {shape}")
        return {OUTPUT_NAME: y}
