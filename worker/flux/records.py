"""The layer records an accepted model is made of, and the scanner's verdict.

Plain frozen dataclasses holding numpy views of the weights in numpy layout: a
Julia array of size (d1, ..., dn) is the row-major numpy array of shape
(dn, ..., d1) over the same bytes, so every per-dimension tuple (stride, pad,
dilation, pooling window) is stored reversed too. Each layer's `summary` is a
one-line Flux-style description of it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

import numpy as np

ACCEPTED, REFUSED, NOT_A_MODEL = "accepted", "refused", "not-a-model"


@dataclasses.dataclass(frozen=True)
class Reason:
    place: str
    message: str

    def __str__(self) -> str:
        return f"{self.place}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Dense:
    weight: np.ndarray            # numpy layout (in, out) == Julia (out, in)
    bias: np.ndarray | None       # (out,), None for bias=false / Flux.Zeros
    activation: str

    @property
    def summary(self) -> str:
        out, inp = self.weight.shape[1], self.weight.shape[0]
        extra = "" if self.activation == "identity" else f", {_act_name(self.activation)}"
        return f"Dense({inp} => {out}{extra}{'' if self.bias is not None else '; bias=false'})"


@dataclasses.dataclass(frozen=True)
class Conv:
    weight: np.ndarray            # numpy (Cout, Cin/groups, k...) == Julia (k..., Cin/groups, Cout)
    bias: np.ndarray | None
    activation: str
    stride: tuple[int, ...]       # numpy order (last Julia dim first)
    pad: tuple[tuple[int, int], ...]  # per numpy spatial axis: (low, high)
    dilation: tuple[int, ...]
    groups: int

    @property
    def summary(self) -> str:
        kernel = tuple(reversed(self.weight.shape[2:]))
        cin, cout = self.weight.shape[1] * self.groups, self.weight.shape[0]
        parts = [f"{_jl_tuple(kernel)}", f"{cin} => {cout}"]
        if self.activation != "identity":
            parts.append(_act_name(self.activation))
        jpad = tuple(v for pair in reversed(self.pad) for v in pair)
        if any(jpad):
            parts.append(f"pad={_jl_tuple(jpad)}")
        if any(s != 1 for s in self.stride):
            parts.append(f"stride={_jl_tuple(tuple(reversed(self.stride)))}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation={_jl_tuple(tuple(reversed(self.dilation)))}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=false")
        return f"Conv({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class Pool:
    mode: str                     # "max" or "mean"
    window: tuple[int, ...]       # numpy order
    pad: tuple[tuple[int, int], ...]
    stride: tuple[int, ...]

    @property
    def summary(self) -> str:
        name = "MaxPool" if self.mode == "max" else "MeanPool"
        window = tuple(reversed(self.window))
        parts = [_jl_tuple(window)]
        jpad = tuple(v for pair in reversed(self.pad) for v in pair)
        if any(jpad):
            parts.append(f"pad={_jl_tuple(jpad)}")
        if tuple(reversed(self.stride)) != window:
            parts.append(f"stride={_jl_tuple(tuple(reversed(self.stride)))}")
        return f"{name}({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    activation: str
    beta: np.ndarray | None       # None when affine=false
    gamma: np.ndarray | None
    mean: np.ndarray
    var: np.ndarray
    eps: float

    @property
    def summary(self) -> str:
        extra = "" if self.activation == "identity" else f", {_act_name(self.activation)}"
        return f"BatchNorm({self.mean.shape[0]}{extra}{'' if self.beta is not None else ', affine=false'})"


@dataclasses.dataclass(frozen=True)
class Dropout:
    p: float

    @property
    def summary(self) -> str:
        return f"Dropout({self.p:g})"


@dataclasses.dataclass(frozen=True)
class Function:
    name: str                     # "softmax", "flatten" or "identity"

    @property
    def summary(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class Chain:
    layers: tuple
    names: tuple[str, ...] | None  # NamedTuple chains

    @property
    def summary(self) -> str:
        return f"Chain({len(self.layers)} layers)"


Layer = Union[Dense, Conv, Pool, BatchNorm, Dropout, Function, Chain]


@dataclasses.dataclass(frozen=True)
class Model:
    key: str                      # top-level key holding the model
    root: Layer
    dtype: np.dtype               # element type of every weight array
    datatype: str                 # its Open Inference Protocol name
    input_shape: tuple[int, ...]  # numpy layout, -1 = any size
    output_shape: tuple[int, ...]
    layers: tuple[tuple[str, Layer], ...]  # (place, leaf layer) in evaluation order

    def describe(self) -> list[str]:
        lines = [f"{place}: {layer.summary}" for place, layer in self.layers]
        lines.append(f"input {list(self.input_shape)} {self.datatype} -> output {list(self.output_shape)} {self.datatype}")
        return lines


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The scanner's answer for one file.

    accepted: exactly one top-level value is a Flux model sealbox runs (`model`), the rest is
    inert data. refused: something in the file is outside the allowlist or malformed; every
    reason found (up to MAX_REASONS), each with its place. not-a-model: nothing wrong, but no
    Flux model either (weights-only files, plain data).
    """
    file: str
    status: str                   # ACCEPTED, REFUSED or NOT_A_MODEL
    reasons: tuple[Reason, ...]
    model: Model | None = None

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED

    def to_json(self) -> dict:
        out: dict[str, Any] = {"file": self.file, "status": self.status,
                               "reasons": [{"place": r.place, "message": r.message} for r in self.reasons]}
        if self.model is not None:
            m = self.model
            out["model"] = {
                "key": m.key,
                "layers": [{"place": p, "layer": type(l).__name__ if not isinstance(l, Function) else l.name,
                            "summary": l.summary} for p, l in m.layers],
                "input": {"name": "input", "datatype": m.datatype, "shape": list(m.input_shape)},
                "output": {"name": "output", "datatype": m.datatype, "shape": list(m.output_shape)},
            }
        return out


def _act_name(act: str) -> str:
    return "σ" if act == "sigmoid" else act


def _jl_tuple(values: tuple) -> str:
    return f"({values[0]},)" if len(values) == 1 else "(" + ", ".join(str(v) for v in values) + ")"
