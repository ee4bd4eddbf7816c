"""Numerical tests of FluxNativeEngine against an independent reference.

The files are written in BSON.jl's encoding for three Flux eras (tests/support/flux.py).
The reference below is a separate, loop-based transcription of Flux/NNlib's formulas
in Julia index space (column-major arrays, Julia dimension order, 0-based loops),
in float64; it shares no code with sealbox.worker.flux.evaluator.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tests.support.flux import Era
from sealbox.worker.engine import InputError, ModelError, TensorSpec
from sealbox.worker.flux.native_engine import FluxNativeEngine

ERAS = ["0.10", "0.12", "0.13"]
RNG = np.random.default_rng(20240611)


def rand(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------- reference (Julia index space)

def ref_act(name: str, x: np.ndarray) -> np.ndarray:
    def one(v: float) -> float:
        if name == "identity":
            return v
        if name == "relu":
            return v if v > 0 else 0.0
        if name in ("sigmoid", "sigmoid_fast", "σ"):
            return 1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v))
        if name in ("tanh", "tanh_fast"):
            return math.tanh(v)
        if name == "leakyrelu":
            return v if v > 0 else 0.01 * v
        if name == "elu":
            return v if v >= 0 else math.exp(v) - 1
        if name == "selu":
            return 1.0507009873554805 * (v if v > 0 else 1.6732632423543772 * (math.exp(v) - 1))
        if name == "softplus":
            return math.log(1 + math.exp(v)) if v < 30 else v
        if name == "gelu":
            return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
        raise AssertionError(name)
    return np.vectorize(one, otypes=[np.float64])(x)


def ref_dense(w, b, act, x):
    """Julia: σ.(W*x .+ b), W (out, in), x (in, batch)."""
    y = w.astype(np.float64) @ x.astype(np.float64)
    if b is not None:
        y = y + b[:, None]
    return ref_act(act, y)


def ref_conv(w, b, act, x, stride, pad, dilation, groups=1):
    """NNlib conv with flipkernel=false: y[o, co] = Σ w[K-1-k, ci, co] x[o*s + k*d - lo, ci]."""
    n = w.ndim - 2
    ks, cpg, cout = w.shape[:n], w.shape[n], w.shape[n + 1]
    spatial, batch = x.shape[:n], x.shape[n + 1]
    lo = [pad[2 * i] for i in range(n)] if len(pad) == 2 * n else list(pad)
    hi = [pad[2 * i + 1] for i in range(n)] if len(pad) == 2 * n else list(pad)
    out = [(spatial[i] + lo[i] + hi[i] - dilation[i] * (ks[i] - 1) - 1) // stride[i] + 1 for i in range(n)]
    opg = cout // groups
    y = np.zeros(tuple(out) + (cout, batch))
    for bi in range(batch):
        for co in range(cout):
            g = co // opg
            for o in itertools.product(*[range(v) for v in out]):
                total = 0.0
                for k in itertools.product(*[range(v) for v in ks]):
                    pos = [o[i] * stride[i] + k[i] * dilation[i] - lo[i] for i in range(n)]
                    if any(p < 0 or p >= spatial[i] for i, p in enumerate(pos)):
                        continue
                    flipped = tuple(ks[i] - 1 - k[i] for i in range(n))
                    for ci in range(cpg):
                        total += float(w[flipped + (ci, co)]) * float(x[tuple(pos) + (g * cpg + ci, bi)])
                y[o + (co, bi)] = total + (float(b[co]) if b is not None else 0.0)
    return ref_act(act, y)


def ref_pool(kind, x, k, pad, stride):
    n = len(k)
    spatial, chans, batch = x.shape[:n], x.shape[n], x.shape[n + 1]
    lo = [pad[2 * i] for i in range(n)]
    hi = [pad[2 * i + 1] for i in range(n)]
    out = [(spatial[i] + lo[i] + hi[i] - k[i]) // stride[i] + 1 for i in range(n)]
    y = np.zeros(tuple(out) + (chans, batch))
    for bi, c in itertools.product(range(batch), range(chans)):
        for o in itertools.product(*[range(v) for v in out]):
            vals = []
            for kk in itertools.product(*[range(v) for v in k]):
                pos = [o[i] * stride[i] + kk[i] - lo[i] for i in range(n)]
                inside = all(0 <= p < spatial[i] for i, p in enumerate(pos))
                vals.append(float(x[tuple(pos) + (c, bi)]) if inside else None)
            if kind == "MaxPool":
                y[o + (c, bi)] = max(v for v in vals if v is not None)
            else:    # NNlib's meanpool divides by the whole window, padding counted as zeros
                y[o + (c, bi)] = sum(v for v in vals if v is not None) / math.prod(k)
    return y


def ref_batchnorm(x, beta, gamma, mean, var, eps, act):
    """Channel dim is N-1 (Julia), i.e. the second to last."""
    shape = [1] * x.ndim
    shape[-2] = -1
    r = lambda v: np.asarray(v, np.float64).reshape(shape)  # noqa: E731
    y = (x - r(mean)) / np.sqrt(r(var) + eps)
    if gamma is not None:
        y = r(gamma) * y + r(beta)
    return ref_act(act, y)


def ref_softmax(x):
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def ref_flatten(x):
    return x.reshape(-1, x.shape[-1], order="F")


# ---------------------------------------------------------------- helpers

def load(tmp_path, data: bytes, name="model.bson") -> FluxNativeEngine:
    path = tmp_path / name
    path.write_bytes(data)
    return FluxNativeEngine.load({name: str(path)})


def run(engine: FluxNativeEngine, x_julia: np.ndarray) -> np.ndarray:
    """Send the Julia-shaped input in numpy layout (axes reversed), return the output Julia-shaped."""
    out = engine.infer({"input": np.ascontiguousarray(x_julia.T)})["output"]
    return out.T


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("act", ["identity", "relu", "sigmoid", "tanh", "leakyrelu", "elu", "selu",
                                 "softplus", "gelu", "tanh_fast", "sigmoid_fast"])
def test_dense_every_activation(tmp_path, era, act):
    e = Era(era)
    name = {"sigmoid": "σ"}.get(act, act)
    w, b, w2 = rand(4, 3), rand(4), rand(2, 4)
    b2 = None if era != "0.10" else np.zeros(2, np.float32)    # no bias: false / Flux.Zeros; 0.10 has neither
    engine = load(tmp_path, e.file(e.chain([e.dense(w, b, name), e.dense(w2, b2)])))
    assert engine.inputs == (TensorSpec("input", "FP32", (-1, 3)),)
    assert engine.outputs == (TensorSpec("output", "FP32", (-1, 2)),)
    x = rand(3, 5, scale=2.0)
    want = ref_dense(w2, b2, "identity", ref_dense(w, b, act, x))
    close(run(engine, x), want)


@pytest.mark.parametrize("era", ERAS)
def test_conv_batchnorm_pool_dropout_flatten_softmax(tmp_path, era):
    e = Era(era)
    w1, b1 = rand(3, 2, 2, 4), rand(4)                 # (kW, kH, Cin, Cout)
    w2 = rand(2, 2, 4, 3)
    bn = dict(beta=rand(3), gamma=rand(3), mean=rand(3), var=np.abs(rand(3)) + 0.5)
    dense_w, dense_b = rand(5, 4 * 2 * 3), rand(5)
    pad1 = (1, 1, 0, 1)
    model = e.chain([
        e.conv(w1, b1, "relu", stride=(1, 2), pad=pad1),
        e.pool("MaxPool", (2, 2)),
        e.conv(w2, None if era != "0.10" else np.zeros(3, np.float32), "identity", pad=(1, 0, 1, 0)),
        e.batchnorm(act="tanh", eps=1e-3, **bn),
        e.dropout(0.3),
        e.pool("MeanPool", (2, 2), pad=(0, 1, 1, 0), stride=(1, 1)),
        e.function("flatten"),
        e.dense(dense_w, dense_b, "elu"),
        e.function("softmax"),
    ])
    engine = load(tmp_path, e.file(model))
    assert engine.inputs == (TensorSpec("input", "FP32", (-1, 2, -1, -1)),)
    assert engine.outputs == (TensorSpec("output", "FP32", (-1, 5)),)
    x = rand(8, 10, 2, 3)                               # Julia WHCN: W=8, H=10
    y = ref_conv(w1, b1, "relu", x, (1, 2), pad1, (1, 1))
    y = ref_pool("MaxPool", y, (2, 2), (0, 0, 0, 0), (2, 2))
    y = ref_conv(w2, None, "identity", y, (1, 1), (1, 0, 1, 0), (1, 1))
    y = ref_batchnorm(y, eps=1e-3, act="tanh", **bn)
    y = ref_pool("MeanPool", y, (2, 2), (0, 1, 1, 0), (1, 1))
    assert y.shape[:3] == (4, 2, 3)
    y = ref_softmax(ref_dense(dense_w, dense_b, "elu", ref_flatten(y)))
    close(run(engine, x), y)


@pytest.mark.parametrize("era", ["0.12", "0.13"])
def test_conv_dilation_groups_symmetric_pad(tmp_path, era):
    e = Era(era)
    w, b = rand(3, 3, 2, 4), rand(4)                   # groups=2: Cin 4 = 2 per group, Cout 4
    engine = load(tmp_path, e.file(e.conv(w, b, "leakyrelu", stride=(2, 1), pad=(2, 1), dilation=(2, 1),
                                          groups=2)))
    assert engine.inputs == (TensorSpec("input", "FP32", (-1, 4, -1, -1)),)
    assert engine.outputs == (TensorSpec("output", "FP32", (-1, 4, -1, -1)),)
    x = rand(9, 7, 4, 2)
    close(run(engine, x), ref_conv(w, b, "leakyrelu", x, (2, 1), (2, 1), (2, 1), groups=2))


def test_conv1d_and_maxpool_padding(tmp_path):
    e = Era("0.13")
    w, b = rand(3, 2, 3), rand(3)
    engine = load(tmp_path, e.file(e.chain([e.conv(w, b, "selu", pad=(2, 0)),
                                            e.pool("MaxPool", (3,), pad=(1, 1), stride=(2,))])))
    assert engine.inputs == (TensorSpec("input", "FP32", (-1, 2, -1)),)
    x = rand(11, 2, 2)
    y = ref_pool("MaxPool", ref_conv(w, b, "selu", x, (1,), (2, 0), (1,)), (3,), (1, 1), (2,))
    close(run(engine, x), y)


def test_batchnorm_without_affine_and_softplus(tmp_path):
    e = Era("0.13")
    mean, var, w, b = rand(4), np.abs(rand(4)) + 0.1, rand(4, 6), rand(4)
    engine = load(tmp_path, e.file(e.chain([e.dense(w, b, "gelu"),
                                            e.batchnorm(None, None, mean, var, act="softplus", affine=False)])))
    x = rand(6, 3)
    want = ref_batchnorm(ref_dense(w, b, "gelu", x), None, None, mean, var, 1e-5, "softplus")
    close(run(engine, x), want)


@pytest.mark.parametrize("form", ["vector", "named"])
def test_vector_and_named_chains(tmp_path, form):
    e = Era("0.13")
    w1, b1, w2, b2 = rand(5, 3), rand(5), rand(2, 5), rand(2)
    layers = [e.dense(w1, b1, "relu"), e.chain([e.dense(w2, b2, "sigmoid_fast"), e.function("identity")])]
    model = e.chain(layers, form=form, names=("enc", "head") if form == "named" else None)
    engine = load(tmp_path, e.file(model))
    x = rand(3, 4)
    close(run(engine, x), ref_dense(w2, b2, "sigmoid", ref_dense(w1, b1, "relu", x)))
    places = [place for place, _ in engine.model.layers]
    if form == "named":
        assert places == ["model.layers.enc", "model.layers.head.layers[1]", "model.layers.head.layers[2]"]
    else:
        assert places == ["model.layers[1]", "model.layers[2].layers[1]", "model.layers[2].layers[2]"]


def test_float64_model_reports_fp64(tmp_path):
    e = Era("0.13")
    w, b = RNG.standard_normal((2, 3)), RNG.standard_normal(2)
    engine = load(tmp_path, e.file(e.dense(w, b, "tanh")))
    assert engine.inputs == (TensorSpec("input", "FP64", (-1, 3)),)
    x = RNG.standard_normal((3, 4))
    out = engine.infer({"input": np.ascontiguousarray(x.T)})["output"]
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.T, ref_dense(w, b, "tanh", x), rtol=1e-12)


# ---------------------------------------------------------------- engine contract

def test_load_needs_exactly_one_bson_file(tmp_path):
    e = Era("0.13")
    (tmp_path / "a.bson").write_bytes(e.file(e.dense(rand(2, 3), rand(2))))
    (tmp_path / "b.bson").write_bytes(e.file(e.dense(rand(2, 3), rand(2))))
    with pytest.raises(ModelError) as err:
        FluxNativeEngine.load({"README.md": str(tmp_path / "a.bson")})
    assert str(err.value) == "a Flux model needs exactly one .bson file, found 0 (files: README.md)"
    with pytest.raises(ModelError) as err:
        FluxNativeEngine.load({"a.bson": str(tmp_path / "a.bson"), "b.bson": str(tmp_path / "b.bson")})
    assert str(err.value) == "a Flux model needs exactly one .bson file, found 2 (files: a.bson, b.bson)"
    # the relative name decides, not the path (workers get /proc/self/fd/N)
    engine = FluxNativeEngine.load({"model.bson": str(tmp_path / "a.bson"), "LICENSE": str(tmp_path / "b.bson")})
    assert engine.platform == "flux-native"


def test_load_refuses_with_the_scanner_reasons(tmp_path):
    e = Era("0.13")
    gadget = e.dense(rand(2, 3), rand(2))[0]
    gadget["data"][2] = {"tag": "struct", "type": {"tag": "datatype", "name": ["Main", "Base", "#run"],
                                                   "params": []}, "data": []}
    (tmp_path / "m.bson").write_bytes(e.file(gadget))
    with pytest.raises(ModelError) as err:
        FluxNativeEngine.load({"m.bson": str(tmp_path / "m.bson")})
    assert str(err.value).startswith("m.bson: refused by the Flux scanner: model.σ: function Base.#run is not "
                                     "allowed; expected an allowed activation (")


def test_load_unreadable_file(tmp_path):
    with pytest.raises(ModelError) as err:
        FluxNativeEngine.load({"m.bson": str(tmp_path / "missing")})
    assert str(err.value) == "m.bson: cannot read: No such file or directory"


def test_infer_rejects_bad_inputs(tmp_path):
    e = Era("0.13")
    engine = load(tmp_path, e.file(e.chain([e.conv(rand(3, 3, 1, 2), rand(2)), e.function("flatten"),
                                            e.dense(rand(3, 2 * 4 * 4), rand(3))])))
    assert engine.inputs == (TensorSpec("input", "FP32", (-1, 1, -1, -1)),)
    ok = engine.infer({"input": np.zeros((2, 1, 6, 6), np.float32)})["output"]
    assert ok.shape == (2, 3)
    with pytest.raises(InputError) as err:
        engine.infer({"input": np.zeros((2, 1, 7, 6), np.float32)})
    assert str(err.value) == ("input 'input' of shape [2, 1, 7, 6] does not fit the model: model.layers[3]: "
                              "Dense(32 => 3) needs 32 input features, got 40 (shape [2, 40])")
    with pytest.raises(InputError) as err:
        engine.infer({"input": np.zeros((2, 1, 2, 6), np.float32)})
    assert str(err.value) == ("input 'input' of shape [2, 1, 2, 6] does not fit the model: model.layers[1]: "
                              "Conv((3, 3), 1 => 2): spatial size 2 is smaller than the window 3")
    with pytest.raises(InputError) as err:
        engine.infer({"input": np.zeros((2, 3, 6, 6), np.float32)})
    assert str(err.value) == "input 'input': shape [2, 3, 6, 6], expected [-1, 1, -1, -1] (-1 = any size)"
    with pytest.raises(InputError) as err:
        engine.infer({"input": np.zeros((2, 1, 6, 6), np.float64)})
    assert str(err.value) == "input 'input': datatype FP64, expected FP32"


def test_conv_in_batch_chunks(tmp_path, monkeypatch):
    """Big batches run in chunks to bound the im2col copy; the result must not change."""
    from sealbox.worker.flux import evaluator
    e = Era("0.13")
    w, b = rand(3, 3, 2, 4), rand(4)
    engine = load(tmp_path, e.file(e.conv(w, b, "relu", pad=(1, 1, 1, 1))))
    x = rand(5, 6, 2, 7)
    monkeypatch.setattr(evaluator, "IM2COL_BYTES", 1)      # one sample per chunk
    close(run(engine, x), ref_conv(w, b, "relu", x, (1, 1), (1, 1, 1, 1), (1, 1)))
