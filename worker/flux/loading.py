"""Loading shared by both Flux engines: the one .bson file, read and scanned once, and its tensor specs.

The native engine (native_engine.py) and the Julia engine (julia_engine.py)
load through scan_model, so every file goes through the allowlist scanner
before either engine touches it, and both report the same TensorSpecs
(numpy layout, see evaluator.py) under the same tensor names.
"""
from __future__ import annotations

from typing import Mapping

from ..engine import ModelError, TensorSpec
from . import bson, scanner
from .records import Model

INPUT_NAME, OUTPUT_NAME = "input", "output"


def model_file(files: Mapping[str, str]) -> tuple[str, str]:
    """The one `*.bson` entry of a model's files, as (signed name, path); ModelError otherwise."""
    found = [(name, path) for name, path in files.items() if name.lower().endswith(".bson")]
    if len(found) != 1:
        names = ", ".join(sorted(files)) or "none"
        raise ModelError(f"a Flux model needs exactly one .bson file, found {len(found)} (files: {names})")
    return found[0]


def scan_model(files: Mapping[str, str]) -> tuple[str, bytes, Model]:
    """Read the .bson file once and scan those bytes; ModelError with every reason unless accepted.

    Returns the bytes too: whoever loads the model must use exactly the bytes that were scanned.
    """
    name, path = model_file(files)
    try:
        data = scanner.read_file(path)
    except OSError as err:
        raise ModelError(f"{name}: cannot read: {err.strerror or err}") from None
    except bson.BsonError as err:
        raise ModelError(f"{name}: refused by the Flux scanner: {name}: {err}") from None
    verdict = scanner.scan_bytes(data, name)
    if not verdict.accepted:
        reasons = "; ".join(str(r) for r in verdict.reasons)
        raise ModelError(f"{name}: {verdict.status} by the Flux scanner: {reasons}")
    return name, data, verdict.model


def tensor_specs(model: Model) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    return ((TensorSpec(INPUT_NAME, model.datatype, model.input_shape),),
            (TensorSpec(OUTPUT_NAME, model.datatype, model.output_shape),))
