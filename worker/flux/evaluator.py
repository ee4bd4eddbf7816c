"""A numpy evaluator for the Flux layers the scanner accepts (inference mode only).

Layout. Julia arrays are column-major: a Julia array of size (d1, ..., dn) has
the bytes of the row-major numpy array of shape (dn, ..., d1). So nothing is
transposed; every shape is just read backwards:

* Dense input: Julia (features, batch) == numpy (batch, features);
* Conv input: Julia WHCN (W, H, C, N) == numpy NCHW (N, C, H, W);
  1-d and 3-d convolutions likewise (N, C, W) and (N, C, D, H, W);
* outputs come back the same way, batch first.

The scanner already stores weights in numpy layout (a Dense weight, Julia
(out, in), is numpy (in, out); a Conv kernel, Julia (kW, kH, Cin, Cout), is
numpy (Cout, Cin, kH, kW)) and per-dimension tuples reversed.

Semantics, from Flux 0.14 / NNlib:

* Dense: σ.(W*x .+ b);
* Conv: a true convolution (NNlib flips the kernel unless the layer is a
  CrossCor), zero padding (lo, hi) per spatial dim, stride, dilation, groups;
* MaxPool pads with -Inf; MeanPool pads with zeros and divides by the full
  window size (NNlib counts padded cells);
* BatchNorm (inference): λ.(γ .* (x .- μ) ./ sqrt.(σ² .+ ϵ) .+ β) over the
  channel axis (numpy axis 1), without γ, β when affine=false;
* Dropout and identity: identity; flatten: (batch, rest); softmax over Julia
  dims=1, i.e. the last numpy axis;
* activations: NNlib's formulas; the `_fast` variants (tanh_fast,
  sigmoid_fast) are approximations of tanh and σ in Julia and are computed
  exactly here.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .records import BatchNorm, Conv, Dense, Dropout, Function, Model, Pool
from .shapes import layer_shape

SELU_LAMBDA = 1.0507009873554805
SELU_ALPHA = 1.6732632423543772
GELU_K = math.sqrt(2 / math.pi)
IM2COL_BYTES = 64 << 20      # peak size of one convolution's window copy


def _sigmoid(x):
    t = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + t), t / (1 + t)).astype(x.dtype, copy=False)


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _elu(x, alpha=1.0):
    return np.where(x >= 0, x, alpha * np.expm1(np.minimum(x, 0))).astype(x.dtype, copy=False)


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "sigmoid": _sigmoid,
    "sigmoid_fast": _sigmoid,
    "tanh": np.tanh,
    "tanh_fast": np.tanh,
    "leakyrelu": lambda x: np.where(x > 0, x, x * x.dtype.type(0.01)),
    "elu": _elu,
    "selu": lambda x: (x.dtype.type(SELU_LAMBDA) * np.where(
        x > 0, x, x.dtype.type(SELU_ALPHA) * np.expm1(np.minimum(x, 0)))).astype(x.dtype, copy=False),
    "softplus": _softplus,
    "gelu": lambda x: (x / 2 * (1 + np.tanh(x.dtype.type(GELU_K) * (x + x.dtype.type(0.044715) * x ** 3)))
                       ).astype(x.dtype, copy=False),
}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _windows(x: np.ndarray, window: tuple[int, ...], stride: tuple[int, ...],
             dilation: tuple[int, ...]) -> np.ndarray:
    """View of x (B, C, *spatial) as (B, C, *out, *window) for the given stride and dilation."""
    n = len(window)
    span = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    view = sliding_window_view(x, span, axis=tuple(range(2, 2 + n)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride) \
        + tuple(slice(None, None, d) for d in dilation)
    return view[index]


def _pad(x: np.ndarray, pad: tuple[tuple[int, int], ...], value: float) -> np.ndarray:
    if not any(lo or hi for lo, hi in pad):
        return x
    return np.pad(x, ((0, 0), (0, 0)) + tuple(pad), constant_values=value)


def _conv(layer: Conv) -> Callable[[np.ndarray], np.ndarray]:
    n = layer.weight.ndim - 2
    g = layer.groups
    cout, cpg = layer.weight.shape[:2]
    kernel = layer.weight.shape[2:]
    # Flux's Conv is a true convolution: flip the kernel, then cross-correlate.
    flipped = layer.weight[(slice(None), slice(None)) + (slice(None, None, -1),) * n]
    # (groups, cpg * prod(kernel), cout/groups) for one matmul per group
    wmat = np.ascontiguousarray(flipped.reshape(g, cout // g, cpg * math.prod(kernel)).transpose(0, 2, 1))
    bias = None if layer.bias is None else layer.bias.reshape((1, cout) + (1,) * n)
    act = ACTIVATIONS[layer.activation]

    def run(x: np.ndarray) -> np.ndarray:
        # im2col copies every window: bound that copy by running the batch in chunks
        per_sample = x.itemsize * cpg * g * math.prod(kernel) * math.prod(
            ((size + lo + hi - (k - 1) * d - 1) // s + 1)
            for size, k, (lo, hi), s, d in zip(x.shape[2:], kernel, layer.pad, layer.stride, layer.dilation))
        chunk = max(1, IM2COL_BYTES // max(1, per_sample))
        if x.shape[0] > chunk:
            return np.concatenate([run(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
        batch = x.shape[0]
        cols = _windows(_pad(x, layer.pad, 0), kernel, layer.stride, layer.dilation)   # (B, C, *out, *k)
        out = cols.shape[2:2 + n]
        cols = cols.reshape((batch, g, cpg) + out + kernel)
        # -> (g, B, *out, cpg, *k) -> (g, B*P, cpg*K)
        order = (1, 0) + tuple(range(3, 3 + n)) + (2,) + tuple(range(3 + n, 3 + 2 * n))
        cols = cols.transpose(order).reshape(g, batch * math.prod(out), cpg * math.prod(kernel))
        y = np.matmul(cols, wmat)                                    # (g, B*P, cout/g)
        y = y.reshape((g, batch) + out + (cout // g,))
        y = y.transpose((1, 0, n + 2) + tuple(range(2, 2 + n))).reshape((batch, cout) + out)
        if bias is not None:
            y = y + bias
        return act(y)
    return run


def _pool(layer: Pool) -> Callable[[np.ndarray], np.ndarray]:
    n = len(layer.window)
    axes = tuple(range(-n, 0))
    ones = (1,) * n
    if layer.mode == "max":
        return lambda x: _windows(_pad(x, layer.pad, -np.inf), layer.window, layer.stride, ones).max(axis=axes)
    size = math.prod(layer.window)
    return lambda x: (_windows(_pad(x, layer.pad, 0), layer.window, layer.stride, ones).sum(axis=axes)
                      / x.dtype.type(size)).astype(x.dtype, copy=False)


def _batchnorm(layer: BatchNorm) -> Callable[[np.ndarray], np.ndarray]:
    act = ACTIVATIONS[layer.activation]
    dtype = layer.mean.dtype

    def run(x: np.ndarray) -> np.ndarray:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = (x - layer.mean.reshape(shape)) / np.sqrt(layer.var.reshape(shape) + dtype.type(layer.eps))
        if layer.gamma is not None:
            y = layer.gamma.reshape(shape) * y + layer.beta.reshape(shape)
        return act(y.astype(dtype, copy=False))
    return run


def _dense(layer: Dense) -> Callable[[np.ndarray], np.ndarray]:
    act = ACTIVATIONS[layer.activation]
    if layer.bias is None:
        return lambda x: act(x @ layer.weight)
    return lambda x: act(x @ layer.weight + layer.bias)


def _function(layer: Function) -> Callable[[np.ndarray], np.ndarray]:
    if layer.name == "softmax":
        return softmax
    if layer.name == "flatten":
        return lambda x: x.reshape(x.shape[0], math.prod(x.shape[1:]))    # -1 fails on an empty batch
    return lambda x: x


_BUILDERS = {
    Dense: _dense, Conv: _conv, Pool: _pool, BatchNorm: _batchnorm,
    Dropout: lambda layer: (lambda x: x), Function: _function,
}


class Evaluator:
    """Runs an accepted model: call it with a numpy-layout batch, get the numpy-layout output."""

    def __init__(self, model: Model):
        self.model = model
        self.steps = [(place, layer, _BUILDERS[type(layer)](layer)) for place, layer in model.layers]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raise shapes.ShapeError (naming the layer) if x does not fit the model."""
        with np.errstate(over="ignore", under="ignore"):
            for place, layer, run in self.steps:
                expected = layer_shape(layer, x.shape, place)
                x = run(x)
                if x.shape != expected:   # the shape rules and the evaluator disagree: a bug, not a bad input
                    raise RuntimeError(f"{place}: evaluated shape {x.shape}, expected {expected}")
        return np.ascontiguousarray(x, dtype=self.model.dtype)
