"""The engine interface: how a worker turns verified model bytes into a callable.

One engine per model format. The worker hands an engine the model's files as
a mapping from the signed relative name ("weights.safetensors") to a path the
engine may open ("/proc/self/fd/5": a sealed copy of exactly the verified
bytes). Engines never see the host's model directory.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import threading
from typing import Mapping

import numpy as np

from ..proto.tensors import DATATYPES

# Open Inference Protocol datatypes <-> numpy dtypes: one table, shared with the wire codec.
DATATYPE_TO_NUMPY = DATATYPES
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPE_TO_NUMPY.items()}


class ModelError(Exception):
    """The model's files are unusable: refused at load, with the file and the reason."""


class InputError(Exception):
    """A request does not fit the model (name, datatype or shape): INVALID_ARGUMENT."""


class InferenceError(Exception):
    """The model failed on a request that fits its metadata: INTERNAL, with a clean message."""


def announce(what: str) -> None:
    """Say on stderr what the worker is about to do ("parsing weights.gguf ...") before it does it.

    The supervisor quotes the worker's last such line when the worker dies while loading, so a parser
    killed by a signal is reported with the file it was parsing.
    """
    import sys
    from ..proto.contract import STDERR_PREFIX
    print(f"{STDERR_PREFIX}{what}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str              # an Open Inference Protocol datatype, e.g. "FP32"
    shape: tuple[int, ...]     # -1 for a variable dimension

    @property
    def numpy_dtype(self) -> np.dtype:
        return DATATYPE_TO_NUMPY[self.datatype]

    def check(self, array: np.ndarray) -> None:
        """Raise InputError unless array fits this spec."""
        expected = DATATYPE_TO_NUMPY[self.datatype]
        if array.dtype != expected:
            raise InputError(f"input '{self.name}': datatype {NUMPY_TO_DATATYPE.get(array.dtype, str(array.dtype))}, "
                             f"expected {self.datatype}")
        if len(array.shape) != len(self.shape) or any(
                want != -1 and want != got for want, got in zip(self.shape, array.shape)):
            raise InputError(f"input '{self.name}': shape {list(array.shape)}, expected {list(self.shape)} "
                             "(-1 = any size)")

    @classmethod
    def from_json(cls, obj: Mapping, where: str) -> "TensorSpec":
        try:
            name, datatype, shape = obj["name"], obj["datatype"], obj["shape"]
        except (KeyError, TypeError) as exc:
            raise ModelError(f"{where}: tensor entry needs name, datatype and shape") from exc
        if not isinstance(name, str) or not name:
            raise ModelError(f"{where}: tensor name must be a non-empty string")
        if datatype not in DATATYPE_TO_NUMPY:
            raise ModelError(f"{where}: tensor '{name}': unsupported datatype {datatype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  and d >= -1 for d in shape):
            raise ModelError(f"{where}: tensor '{name}': shape must be a list of integers >= -1")
        return cls(name, datatype, tuple(shape))


class Engine(abc.ABC):
    """A loaded model. Built once per worker by `load`; the worker calls `load` and `responses` (whose
    default calls `infer`) from one thread."""

    #: reported as ModelMetadataResponse.platform
    platform: str = ""
    #: modules a warm-pool worker imports before its model is known (the engine's start-up cost)
    warm_imports: tuple[str, ...] = ()
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    #: outputs sent when a request names none (None = all outputs)
    default_outputs: tuple[str, ...] | None = None
    #: seconds per load phase the engine measured itself (e.g. {"deserialize_s": .., "warmup_s": ..}),
    #: reported to the supervisor with the worker's own total `load_s`
    load_phases: Mapping[str, float] = {}

    @classmethod
    @abc.abstractmethod
    def load(cls, files: Mapping[str, str]) -> "Engine":
        """Parse the model from files (signed name -> openable path); raise ModelError if unusable."""

    def keep_freed_buffers(self, max_bytes: int) -> None:
        """Called once, after load and before serving: the engine may keep up to `max_bytes` of the
        memory its calls free for the next calls (the worker's largest message, at most a quarter of its
        memory limit: SandboxProfile.freed_buffer_bytes), rather than give it back to the kernel and
        fault it in afresh each call. The default changes nothing."""

    @abc.abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on checked inputs; return one array per output spec, by name."""

    def responses(self, inputs, *, streaming: bool, cancelled: threading.Event):
        """The responses to one request, one dict of outputs (name -> np.ndarray) each. streaming is True when
        the call came through ModelStreamInfer (the engine may then yield several); the worker stops iterating
        and drops the rest once cancelled is set. Default: one response from infer()."""
        yield self.infer(inputs)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Raise InputError unless inputs are exactly this model's inputs, each fitting its spec."""
        expected = {spec.name for spec in self.inputs}
        if set(inputs) != expected:
            raise InputError(f"inputs {sorted(inputs)}, expected {sorted(expected)}")
        for spec in self.inputs:
            spec.check(inputs[spec.name])


# Engine name (the model's `format` in the daemon config) -> "module:class".
ENGINES = {
    "mlx": "sealbox.worker.mlx_engine:MlxEngine",
    "flux": "sealbox.worker.flux.native_engine:FluxNativeEngine",
    "julia": "sealbox.worker.flux.julia_engine:JuliaEngine",
    "mlx-lm": "sealbox.worker.llm_engine:LlmEngine",
}


def engine_class(name: str) -> type[Engine]:
    try:
        module, _, attr = ENGINES[name].partition(":")
    except KeyError:
        raise ModelError(f"unknown model format {name!r} (known: {', '.join(sorted(ENGINES))})") from None
    return getattr(importlib.import_module(module), attr)
