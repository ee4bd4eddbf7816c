"""Dynamic batching inside the worker: which requests may share one engine call, and how their rows
are joined and split back.

The supervisor never parses tensors; it only lets enough calls through to the worker (its gate
scales with max_batch_size). Here, on the engine thread, calls already queued (or arriving within
max_queue_delay_us) are joined along the first dimension when they have the same inputs, datatypes
and trailing dimensions, run as one engine call, and each caller gets exactly its own rows of every
output it asked for. A request that does not fit (another dtype or shape, a stream, too many rows)
runs alone, in its turn: calls still end in the order they arrived.
"""
from __future__ import annotations

import numpy as np

from .engine import InferenceError, ModelError


def check_batchable(engine, max_batch_size: int) -> None:
    """Refuse the model (ModelError, naming the tensor) unless every input and output has -1 as its
    first dimension: only then is the first dimension a batch that can be joined and split."""
    for kind, specs in (("input", engine.inputs), ("output", engine.outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] != -1:
                raise ModelError(f"dynamic batching (max_batch_size {max_batch_size}) needs -1 as the first "
                                 f"dimension of every input and output: {kind} '{spec.name}' has shape "
                                 f"{list(spec.shape)}")


def batch_key(inputs: dict[str, np.ndarray]):
    """(key, rows): requests with equal keys can be joined; None when this one cannot (no rows, or
    inputs that disagree on their first dimension)."""
    rows = {array.shape[0] if array.ndim else None for array in inputs.values()}
    if len(rows) != 1 or None in rows or 0 in rows:
        return None, 0
    key = tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items()))
    return key, rows.pop()


def join(members: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The members' inputs, concatenated along the first dimension, in order."""
    return {name: np.concatenate([m[name] for m in members]) for name in members[0]}


def split(result: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Each member's rows of every output; InferenceError unless each output has all the rows."""
    total = sum(rows)
    for name, array in result.items():
        array = np.asarray(array)
        if array.ndim == 0 or array.shape[0] != total:
            raise InferenceError(f"output '{name}' has shape {list(array.shape)} for a batch of {total} rows")
        result[name] = array
    parts, start = [], 0
    for n in rows:
        parts.append({name: array[start:start + n] for name, array in result.items()})
        start += n
    return parts
