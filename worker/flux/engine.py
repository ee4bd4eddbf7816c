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

from sealbox.worker.engine import Engine, InputError, ModelError, TensorSpec
from sealbox.worker.flux import evaluator, scanner

INPUT_NAME, OUTPUT_NAME = "input", "output"


def model_file(files: Mapping[str, str]) -> tuple[str, str]:
    """The one `*.bson` entry of a model's files, as (signed name, path); ModelError otherwise."""
    found = [(name, path) for name, path in files.items() if name.lower().endswith(".bson")]
    if len(found) != 1:
        names = ", ".join(sorted(files)) or "none"
        raise ModelError(f"a Flux model needs exactly one .bson file, found {len(found)} (files: {names})")
    return found[0]


def scan_model(files: Mapping[str, str]) -> tuple[str, bytes, scanner.Model]:
    """Read the .bson file once and scan those bytes; ModelError with every reason unless accepted.

    Returns the bytes too: whoever loads the model must use exactly the bytes that were scanned.
    """
    name, path = model_file(files)
    try:
        data = scanner.read_file(path)
    except OSError as err:
        raise ModelError(f"{name}: cannot read: {err.strerror or err}") from None
    except scanner.bson.BsonError as err:
        raise ModelError(f"{name}: refused by the Flux scanner: {name}: {err}") from None
    verdict = scanner.scan_bytes(data, name)
    if not verdict.accepted:
        reasons = "; ".join(str(r) for r in verdict.reasons)
        raise ModelError(f"{name}: {verdict.status} by the Flux scanner: {reasons}")
    return name, data, verdict.model


def tensor_specs(model: scanner.Model) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    return ((TensorSpec(INPUT_NAME, model.datatype, model.input_shape),),
            (TensorSpec(OUTPUT_NAME, model.datatype, model.output_shape),))


class FluxNativeEngine(Engine):
    platform = "flux-native"

    def __init__(self, name: str, model: scanner.Model):
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
        except scanner.ShapeError as err:
            raise InputError(f"input '{INPUT_NAME}' of shape {list(inputs[INPUT_NAME].shape)} does not fit "
                             f"the model: {err}") from None
        return {OUTPUT_NAME: out}
