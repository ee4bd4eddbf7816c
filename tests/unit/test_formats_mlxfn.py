"""What is checked of an .mlxfn before MLX imports it: size, version field, the running MLX (check_file); the
tape, node by node (check_graph): known primitives, their state, references backwards only, depth bounded."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from tests.support.formats import add_chain, add_node, mlxfn_with_version
from sealbox.worker.engine import ModelError, TensorSpec
from sealbox.worker.formats import mlxfn

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import mlx.core as mx
    directory = tmp_path_factory.mktemp("mlxfn")
    mx.export_function(str(directory / "s.mlxfn"), lambda x: x * 2, mx.zeros((1, 4)), shapeless=True)
    mx.export_function(str(directory / "f.mlxfn"), lambda x: x * 2, mx.zeros((1, 4)))
    return directory


def test_what_mlx_writes_is_accepted_with_its_shapeless_flag(exported):
    import mlx.core as mx
    assert mx.__version__ in mlxfn.KNOWN_VERSIONS, "a new MLX: re-check the layout notes in worker/formats/mlxfn.py"
    assert mlxfn.check_file(str(exported / "s.mlxfn"), "s.mlxfn", mx.__version__) == {
        "version": mx.__version__, "shapeless": True}
    assert mlxfn.check_file(str(exported / "f.mlxfn"), "f.mlxfn", mx.__version__)["shapeless"] is False


@pytest.mark.parametrize("version, message", [
    (b"0.31.0", "model.mlxfn: written by MLX 0.31.0; this reader knows the layout of MLX 0.32.4 only"),
    (b"0.32.4\x00", "model.mlxfn: version field b'0.32.4\\x00' is not an MLX version"),
    (b"", "model.mlxfn: version field length 0 is not that of an MLX version (1 to 32 bytes, then the graph)"),
    (b"9" * 33, "model.mlxfn: version field length 33 is not that of an MLX version (1 to 32 bytes, then the graph)"),
])
def test_unknown_or_malformed_versions_are_refused(tmp_path, exported, version, message):
    path = tmp_path / "model.mlxfn"
    path.write_bytes(mlxfn_with_version((exported / "s.mlxfn").read_bytes(), version))
    with pytest.raises(ModelError) as err:
        mlxfn.check_file(str(path), "model.mlxfn", "0.32.4")
    assert str(err.value) == message


def test_running_mlx_must_be_the_writer(exported):
    with pytest.raises(ModelError) as err:
        mlxfn.check_file(str(exported / "s.mlxfn"), "s.mlxfn", "0.33.0")
    assert str(err.value) == "s.mlxfn: written by MLX 0.32.4, but the worker runs MLX 0.33.0"


def test_size_bound_and_short_files(tmp_path):
    big = tmp_path / "big.mlxfn"
    with open(big, "wb") as f:
        f.truncate(mlxfn.MAX_BYTES + 1)      # sparse: nothing is read before the size is checked
    with pytest.raises(ModelError) as err:
        mlxfn.check_file(str(big), "big.mlxfn", "0.32.4")
    assert str(err.value) == f"big.mlxfn: {mlxfn.MAX_BYTES + 1} bytes, more than the {mlxfn.MAX_BYTES} an " \
                             "exported function may have"
    short = tmp_path / "short.mlxfn"
    short.write_bytes(b"\x06\x00")
    with pytest.raises(ModelError) as err:
        mlxfn.check_file(str(short), "short.mlxfn", "0.32.4")
    assert str(err.value) == "short.mlxfn: 2 bytes: too short for an MLX exported function"


# ---- the tape walk (check_graph): every node's primitive known, references backwards only, depth bounded

X = [TensorSpec("x", "FP32", (-1, 4))]
Y = [TensorSpec("y", "FP32", (-1, 4))]


def _layer():
    import mlx.core as mx
    import mlx.nn as nn
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    layer.eval()
    mx.eval(layer.parameters())        # else the lazy initialisation (RandomBits) is traced too
    return lambda x: layer(x, None)


# What the project's models and tests export, and what a small transformer block needs: each exported by
# MLX 0.32.4 (shapeless, except where a slice makes MLX 0.32.4 refuse to replay it shapeless: "Slice cannot
# infer output shapes"), walked to its last byte, and imported and called by MLX. name -> (function, rank).
EXPORTS = {
    "unary": ("lambda x: mx.tanh(mx.exp(mx.abs(x))) + mx.sin(x) + mx.cos(x) + mx.sigmoid(x) + mx.sqrt(mx.abs(x))"
              " + mx.rsqrt(mx.abs(x) + 1) + mx.log(mx.abs(x) + 1) + mx.log2(mx.abs(x) + 1) + mx.erf(x) - x"
              " + mx.square(x) + mx.floor(x) + mx.ceil(x) + mx.round(x) + mx.log1p(mx.abs(x)) + mx.sign(x)"
              " + mx.expm1(x) + mx.arctan(x) + mx.sinh(x) + mx.cosh(x) + mx.tan(x) + mx.stop_gradient(x)", 2),
    "binary": ("lambda x: mx.maximum(x, 0) - mx.minimum(x, 1) * x / (x + 3) + mx.power(mx.abs(x), 2)"
               " + mx.logaddexp(x, x) + mx.remainder(x, 2) + mx.arctan2(x, x + 1)", 2),
    "compare": ("lambda x: mx.where((x > 0) & (x <= 1) | (x == 0) | (x != 2) | (x < -1) | (x >= 3)"
                " | mx.logical_not(x > 5) | mx.logical_and(x > 0, x < 1), x, -x)", 2),
    "reduce": ("lambda x: mx.sum(x, axis=1, keepdims=True) + mx.max(x, axis=1, keepdims=True)"
               " + mx.min(x, axis=1, keepdims=True) + mx.prod(x, axis=1, keepdims=True)"
               " + mx.mean(x, axis=-1, keepdims=True) + mx.logsumexp(x, axis=1, keepdims=True)"
               " + mx.var(x, axis=1, keepdims=True) + mx.argmax(x, axis=1, keepdims=True).astype(mx.float32)", 2),
    "shape": ("lambda x: mx.transpose(mx.reshape(x, (-1, 2, 2)), (0, 2, 1)).reshape(x.shape)"
              " + mx.broadcast_to(x[:, :1], x.shape) + mx.concatenate([x[:, :2], x[:, 2:]], axis=1)"
              " + mx.expand_dims(x, 0).squeeze(0) + mx.pad(x, ((0, 0), (1, 0)))[:, :4]"
              " + mx.flatten(x[:, None, :], 1, 2) + mx.unflatten(x, 1, (2, 2)).reshape(x.shape)", 2),
    "split": ("lambda x: sum(mx.split(x, 2, axis=1)[::-1])", 2),
    "activations": ("lambda x: mx.softmax(x, axis=-1) + nn.gelu(x) + nn.relu(x) + nn.silu(x) + nn.tanh(x)", 2),
    "matmul": ("lambda x: mx.addmm(x, x, mx.ones((4, 4)), alpha=0.5, beta=2.0) + x @ mx.full((4, 4), 0.5)", 2),
    "take": ("lambda x: mx.take(x, mx.array([0, 2]), axis=1).sum(axis=1, keepdims=True)"
             " + mx.take_along_axis(x, mx.argsort(x, axis=1), axis=1) + mx.cumsum(x, axis=1) + mx.sort(x, axis=1)",
             2),
    "astype": ("lambda x: x.astype(mx.float16).astype(mx.float32) + mx.arange(4).astype(mx.float32)"
               " + mx.full((4,), 2.0) + mx.array([1.0, 2.0, 3.0, 4.0])", 2),
    "norms": ("lambda x: mx.fast.layer_norm(x, mx.ones((8,)), mx.zeros((8,)), 1e-5)"
              " + mx.fast.rms_norm(x, mx.ones((8,)), 1e-5)", 3),
    "rope": ("lambda x: mx.fast.rope(x[None], 8, traditional=False, base=10000.0, scale=1.0, offset=0)[0]", 3),
    "attention": ("lambda x: mx.fast.scaled_dot_product_attention(x[None], x[None], x[None], scale=0.3, "
                  "mask='causal')[0]", 3),
    "transformer_block": ("_layer()", 3),
    "convolution": ("lambda x: mx.conv1d(x, mx.ones((4, 3, 8)), stride=1, padding=1)"
                    " + mx.conv_general(x, mx.ones((4, 3, 8)), padding=1, kernel_dilation=1, groups=1, flip=True)", 3),
}

FIXED_SHAPES = ("shape", "split", "rope")


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_every_export_the_project_uses_is_walked_to_its_last_byte(tmp_path, name):
    import mlx.core as mx
    import mlx.nn as nn
    source, rank = EXPORTS[name]
    fn = eval(source, {"mx": mx, "nn": nn, "_layer": _layer})  # noqa: S307 - the test's own table
    example = mx.random.normal((2, 4) if rank == 2 else (2, 3, 8))
    path = tmp_path / "model.mlxfn"
    mx.export_function(str(path), fn, example, shapeless=name not in FIXED_SHAPES)
    spec = [TensorSpec("x", "FP32", (-1,) + tuple(example.shape[1:]))]
    got = mlxfn.check_graph(str(path), "model.mlxfn", spec, Y, {})
    assert 1 <= got["depth"] <= got["nodes"] <= 200
    (y,) = mx.import_function(str(path))(example)
    np.testing.assert_allclose(np.array(y), np.array(fn(example)), rtol=1e-5, atol=1e-5)


def _walk_refusal(data: bytes, tmp_path) -> str:
    path = tmp_path / "model.mlxfn"
    path.write_bytes(data)
    with pytest.raises(ModelError) as err:
        mlxfn.check_graph(str(path), "model.mlxfn", X, Y, {})
    return str(err.value)


def _export(tmp_path, fn) -> bytes:
    import mlx.core as mx
    path = tmp_path / "exported.mlxfn"
    mx.export_function(str(path), fn, mx.zeros((2, 4)), shapeless=True)
    return path.read_bytes()


def test_an_unknown_primitive_is_refused_by_name(tmp_path):
    data = _export(tmp_path, lambda x: -x)       # the tape: the input's reference, then Negative
    assert data.count(b"Negative") == 1
    assert _walk_refusal(data.replace(b"Negative", b"Negativz"), tmp_path) == (
        "model.mlxfn: node 2 uses primitive 'Negativz', which this reader does not know (MLX 0.32.4)")
    assert _walk_refusal(data.replace(b"Negative", b"Negat\xffve"), tmp_path) == (
        "model.mlxfn: node 2 uses primitive b'Negat\\xffve', which this reader does not know (MLX 0.32.4)")
    # A primitive MLX knows but this reader leaves out on purpose: as_strided reaches any memory.
    import mlx.core as mx
    strided = _export(tmp_path, lambda x: mx.as_strided(x, (2, 4), (4, 1)))
    assert _walk_refusal(strided, tmp_path).endswith(
        "uses primitive 'AsStrided', which this reader does not know (MLX 0.32.4)")


def test_an_enum_out_of_range_in_a_primitive_state_is_refused(tmp_path):
    import mlx.core as mx
    data = bytearray(_export(tmp_path, lambda x: mx.sum(x, axis=1, keepdims=True)))
    at = data.index(b"Reduce") + len(b"Reduce")
    assert data[at:at + 4] == struct.pack("<i", 2)          # Reduce::Sum
    data[at:at + 4] = struct.pack("<i", 9)
    assert _walk_refusal(bytes(data), tmp_path) == (
        "model.mlxfn: the state of node 2's Reduce holds 9, not one of its 6 enum values")


def test_a_constant_whose_shape_disagrees_with_its_bytes_is_refused(tmp_path):
    import mlx.core as mx
    data = bytearray(_export(tmp_path, lambda x: x + mx.array([1.0, 2.0, 3.0, 4.0])))
    header = struct.pack("<Qi", 1, 4) + struct.pack("<iB", 10, 4)      # the constant: shape [4], float32
    at = data.index(header + struct.pack("<4f", 1, 2, 3, 4))
    data[at + 8:at + 12] = struct.pack("<i", 1000)
    assert _walk_refusal(bytes(data), tmp_path) == (
        f"model.mlxfn: the 4000 bytes of constant node 2 (shape [1000]) at byte {at + len(header)} runs past "
        "the end of the file")
    # A constant shorter than its bytes: the rest is read as the next node, and the walk fails there (how, depends
    # on the ids that follow, which MLX takes from pointers).
    data[at + 8:at + 12] = struct.pack("<i", 2)
    assert _walk_refusal(bytes(data), tmp_path).startswith("model.mlxfn: ")


@pytest.mark.parametrize("tape, output, message", [
    ([add_node(2, (1, 1)), add_node(3, (999, 1))], None,
     "node 3 (id 3) takes input id 999, which no earlier node, input or constant defines"),
    ([add_node(2, (3, 1)), add_node(3, (1, 1))], None,
     "node 2 (id 2) takes input id 3, which no earlier node, input or constant defines"),
    ([add_node(2, (2, 1))], None, "node 2 (id 2) takes input id 2, which no earlier node, input or constant defines"),
    ([add_node(2, (1, 1)), add_node(2, (1, 1))], None, "node 3 defines id 2 a second time"),
    ([add_node(1, (1, 1))], None, "node 2 defines id 1 a second time"),
    ([struct.pack("<QBB", 7, 0, 0)], None, "node 2 refers to id 7 as a function input, but the function has no "
                                           "such input"),
    ([add_node(2, (1, 1))], 99, "output id 99 is defined by no node, input or constant"),
    ([add_node(2, (1, 1), name=b"Equal", state=b"\x02")], None,
     "the state of node 2's Equal at byte 172 is 2, not a bool (0 or 1)"),
    ([add_node(2, (1, 1)).replace(b"\x00" * 12 + b"\x03", b"\x00\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00\x03")],
     None, "node 2 runs on stream (0, 7, 0), not an MLX stream"),
    ([add_node(2, (1,))], None, "node 2 gives Add 1 inputs; it takes 2"),
    ([add_node(2, (1, 1, 1), name=b"Negative")], None, "node 2 gives Negative 3 inputs; it takes 1"),
], ids=["dangling", "forward", "self", "twice", "input-id-again", "not-an-input", "output", "bool", "stream",
        "arity-binary", "arity-unary"])
def test_references_and_fields_of_the_tape(tmp_path, tape, output, message):
    assert _walk_refusal(add_chain(0, tape=tape, output=output), tmp_path) == "model.mlxfn: " + message


def test_trailing_bytes_are_refused(tmp_path):
    data = add_chain(3)
    assert _walk_refusal(data + b"\x00", tmp_path) == f"model.mlxfn: 1 bytes trail the graph at byte {len(data)}"


def test_depth_is_bounded_not_width(tmp_path):
    path = tmp_path / "model.mlxfn"
    path.write_bytes(add_chain(mlxfn.MAX_DEPTH))
    assert mlxfn.check_graph(str(path), "model.mlxfn", X, Y, {}) == {"nodes": mlxfn.MAX_DEPTH + 1,
                                                                     "depth": mlxfn.MAX_DEPTH}
    assert _walk_refusal(add_chain(mlxfn.MAX_DEPTH + 1), tmp_path) == (
        f"model.mlxfn: node {mlxfn.MAX_DEPTH + 2} lies {mlxfn.MAX_DEPTH + 1} primitives deep, more than the "
        f"{mlxfn.MAX_DEPTH} an exported function may have")
    path.write_bytes(add_chain(50_000, wide=True))       # many nodes side by side: depth 1
    assert mlxfn.check_graph(str(path), "model.mlxfn", X, Y, {}) == {"nodes": 50_001, "depth": 1}
