"""Shape propagation through accepted layers, in numpy layout (batch first).

The scanner runs it with unknown sizes (None) to find a model's input and
output shapes; the engines run it on each request's input before evaluating.
"""
from __future__ import annotations

import math

from .records import BatchNorm, Chain, Conv, Dense, Function, Layer, Pool


class ShapeError(Exception):
    """An input shape does not fit a layer; `place` names the layer."""

    def __init__(self, place: str, message: str):
        super().__init__(f"{place}: {message}")
        self.place, self.message = place, message


def leaves(layer: Layer, place: str) -> list[tuple[str, Layer]]:
    if isinstance(layer, Chain):
        out = []
        for i, sub in enumerate(layer.layers):
            where = f"{place}.layers.{layer.names[i]}" if layer.names else f"{place}.layers[{i + 1}]"
            out.extend(leaves(sub, where))
        return out
    return [(place, layer)]


def input_shape(layers: list[tuple[str, Layer]], place: str) -> tuple[int | None, ...]:
    """The numpy-layout input shape (None = any) fixed by the first Dense, Conv or pooling layer."""
    for _, layer in layers:
        if isinstance(layer, Dense):
            return (None, layer.weight.shape[0])
        if isinstance(layer, Conv):
            return (None, layer.weight.shape[1] * layer.groups) + (None,) * (layer.weight.ndim - 2)
        if isinstance(layer, Pool):
            return (None, None) + (None,) * len(layer.window)
        if isinstance(layer, Function) and layer.name == "flatten":
            break
    raise ShapeError(place, "cannot tell the input shape: no Dense, Conv or pooling layer before any flatten")


def layer_shape(layer: Layer, shape: tuple, place: str) -> tuple:
    """Output shape of one leaf layer for an input shape (None = unknown); raise ShapeError on a mismatch.

    Used both statically (with unknown dims) and at inference time (all dims known).
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ShapeError(place, message)

    def shown(s) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in s) + "]"

    if isinstance(layer, Dense):
        inp, out = layer.weight.shape
        need(len(shape) == 2, f"{layer.summary} needs a (batch, features) input, got shape {shown(shape)}")
        need(shape[1] in (None, inp), f"{layer.summary} needs {inp} input features, got {shape[1]} (shape {shown(shape)})")
        return (shape[0], out)
    if isinstance(layer, (Conv, Pool)):
        if isinstance(layer, Conv):
            n = layer.weight.ndim - 2
            cin = layer.weight.shape[1] * layer.groups
            window = tuple((k - 1) * d + 1 for k, d in zip(layer.weight.shape[2:], layer.dilation))
            channels = layer.weight.shape[0]
        else:
            n, cin, window, channels = len(layer.window), None, layer.window, shape[1] if len(shape) > 1 else None
        need(len(shape) == n + 2, f"{layer.summary} needs a rank-{n + 2} input (batch, channels, {n} spatial), "
                                  f"got shape {shown(shape)}")
        need(cin is None or shape[1] in (None, cin), f"{layer.summary} needs {cin} input channels, got {shape[1]}")
        spatial = []
        for size, w, (lo, hi), s in zip(shape[2:], window, layer.pad, layer.stride):
            if size is None:
                spatial.append(None)
                continue
            out = (size + lo + hi - w) // s + 1
            need(size + lo + hi >= w, f"{layer.summary}: spatial size {size} is smaller than the window {w}")
            spatial.append(out)
        return (shape[0], channels) + tuple(spatial)
    if isinstance(layer, BatchNorm):
        chs = layer.mean.shape[0]
        need(len(shape) >= 2 and shape[1] in (None, chs),
             f"{layer.summary} needs {chs} channels on axis 1, got shape {shown(shape)}")
        return shape
    if isinstance(layer, Function) and layer.name == "flatten":
        need(len(shape) >= 2, f"flatten needs at least 2 dimensions, got {shown(shape)}")
        rest = shape[1:]
        return (shape[0], None if None in rest else math.prod(rest))
    return shape          # Dropout, softmax, identity
