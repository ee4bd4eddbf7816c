"""FluxNativeEngine: Flux.jl models saved with BSON.jl, scanned, then evaluated with numpy.

No Julia runs: the allowlist scanner (scanner.py) reads the file with a strict
BSON reader and turns an accepted model into plain layer records, which
evaluator.py evaluates. Tensors are in numpy layout, the reverse of Julia's
dimension order (see evaluator.py): Dense models take (batch, features), 2-d
conv models (batch, channels, height, width).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..engine import Engine, InputError
from . import evaluator
from .loading import INPUT_NAME, OUTPUT_NAME, scan_model, tensor_specs
from .records import Model
from .shapes import ShapeError


class FluxNativeEngine(Engine):
    platform = "flux-native"
    warm_imports = ("numpy",)   # what a warm-pool worker imports before its model arrives

    def __init__(self, name: str, model: Model):
        self.name = name
        self.model = model
        self.inputs, self.outputs = tensor_specs(model)
        self._evaluate = evaluator.Evaluator(model)

    @classmethod
    def load(cls, files: Mapping[str, str]) -> "FluxNativeEngine":
        name, _, model = scan_model(files)
        return cls(name, model)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(inputs)
        try:
            out = self._evaluate(inputs[INPUT_NAME])
        except ShapeError as err:
            raise InputError(f"input '{INPUT_NAME}' of shape {list(inputs[INPUT_NAME].shape)} does not fit "
                             f"the model: {err}") from None
        return {OUTPUT_NAME: out}
