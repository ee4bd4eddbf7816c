"""Every scanner refusal branch, fed the bad thing, with its exact reason."""
from __future__ import annotations

import numpy as np
import pytest

from tests.support.flux import Era, backref, datatype, encode, struct_, symbol, tuple_
from sealbox.worker.flux import scanner

F32 = np.float32


def dense(e, out=2, inp=3, act="relu", bias=True):
    return e.dense(np.ones((out, inp), F32), np.zeros(out, F32) if bias else None, act)


def bn(e, n=2, **kw):
    return e.batchnorm(np.zeros(n, F32), np.ones(n, F32), np.zeros(n, F32), np.ones(n, F32), **kw)


def conv(e, **kw):
    return e.conv(np.ones((3, 3, 2, 4), F32), np.zeros(4, F32), **kw)


def in_chain(e, layer, first=None):
    return e.file(e.chain([first or dense(e, 2, 3), layer] if first is not False else [layer]))


def mutate(layer, index, value):
    node, typ = layer
    node["data"][index] = value
    return node, typ


def case_bn_track_stats(e):
    return in_chain(e, mutate(bn(e), 8, False))


def case_bn_negative_variance(e):
    return in_chain(e, mutate(bn(e), 4, e.array(np.array([1, -1], F32))))


def case_bn_chs(e):
    return in_chain(e, mutate(bn(e), 10, 3))


def case_bn_eps(e):
    return in_chain(e, mutate(bn(e), 5, e.float_scalar(0.0)[0]))


def case_bn_nan(e):
    return in_chain(e, mutate(bn(e), 5, e.float_scalar(float("nan"))[0]))


def case_bn_beta_length(e):
    return in_chain(e, mutate(bn(e), 1, e.array(np.zeros(3, F32))))


def case_bn_affine_false_with_beta(e):
    layer = bn(e)
    layer[0]["data"][7] = False
    return in_chain(e, layer)


def case_bn_char(e):
    return in_chain(e, mutate(bn(e), 6, struct_(datatype(["Core", "Char"]), b"A\x00\x00\x00")))


def case_dropout_p(e):
    return in_chain(e, mutate(e.dropout(0.5), 0, 1.5))


def case_dropout_rng(e):
    twister = struct_(datatype(["Random", "MersenneTwister"]), [[1, 2, 3]])
    return in_chain(e, mutate(e.dropout(0.5), 3, twister))


def case_dropout_dims(e):
    return in_chain(e, mutate(e.dropout(0.5), 1, "all"))


def case_conv_groups(e):
    return e.file(mutate(conv(e), 6, 3))


def case_conv_rank(e):
    return e.file(mutate(conv(e), 1, e.array(np.ones((1, 1, 1, 1, 2, 4), F32))))


def case_conv_stride(e):
    return e.file(mutate(conv(e), 3, tuple_(0, 1)))


def case_conv_pad_length(e):
    return e.file(mutate(conv(e), 4, tuple_(1, 1, 1)))


def case_conv_stride_not_int(e):
    return e.file(mutate(conv(e), 3, tuple_(1, 1.0)))


def case_dense_rank(e):
    return e.file(mutate(dense(e), 0, e.array(np.ones((2, 3, 1), F32))))


def case_dense_bias_length(e):
    return e.file(mutate(dense(e), 1, e.array(np.zeros(5, F32))))


def case_dense_bias_dtype(e):
    return e.file(mutate(dense(e), 1, e.array(np.zeros(2, np.float64))))


def case_mixed_dtypes(e):
    second = e.dense(np.ones((1, 2)), np.zeros(1), "identity")
    return e.file(e.chain([dense(e), second]))


def case_zeros_size(e):
    e11 = Era("0.12")
    layer = dense(e11, bias=False)
    layer[0]["data"][1] = struct_(datatype(["Flux", "Zeros"], [e11.core_type("Float32"), 1]), [tuple_(7)])
    layer[0]["type"]["params"][2] = layer[0]["data"][1]["type"]
    return e11.file(layer)


def case_backref_not_int(e):
    return encode({"model": {"tag": "backref", "ref": "1"}, "_backrefs": [1.0]})


def case_backref_range(e):
    return encode({"model": backref(2), "_backrefs": [1.0]})


def case_backrefs_not_array(e):
    return encode({"model": 1.0, "_backrefs": {"a": 1}})


def case_named_count(e):
    model = e.chain([dense(e), e.function("softmax")], form="named", names=("a", "b"))
    model[0]["data"][0]["type"]["params"][0] = tuple_(symbol("a"))
    return e.file(model)


def case_empty_chain(e):
    return e.file(e.chain([]))


def case_vector_param(e):
    model = e.chain([dense(e), e.function("softmax")], form="vector")
    model[0]["type"]["params"][0] = e.core_type("Array", [e.core_type("Float32"), 1])
    return e.file(model)


def case_array_negative_size(e):
    return e.file(mutate(dense(e), 0, {"tag": "array", "type": e.core_type("Float32"), "size": [-1, 2],
                                       "data": b""}))


def case_array_list_data(e):
    return e.file(mutate(dense(e), 0, {"tag": "array", "type": e.core_type("Float32"), "size": [1, 1],
                                       "data": [1.0]}))


def case_pool_params_size(e):
    layer = e.pool("MaxPool", (2, 2))
    layer[0]["type"]["params"]["data"] = b"\x02" + b"\x00" * 6
    return in_chain(e, layer, first=conv(e))


def case_datatype_name(e):
    return e.file(mutate(dense(e), 2, struct_({"tag": "datatype", "name": [], "params": []}, [])))


def case_datatype_extra_key(e):
    relu = {"tag": "datatype", "name": ["NNlib", "#relu"], "params": [], "extra": 1}
    return e.file(mutate(dense(e), 2, struct_(relu, [])))


def case_unknown_tag(e):
    return e.file(mutate(dense(e), 0, {"tag": "objectid", "data": b"x"}))


def case_unionall(e):
    return e.file(mutate(dense(e), 2, {"tag": "unionall", "body": None, "var": None}))


def case_untagged(e):
    return e.file(mutate(dense(e), 0, {"a": 1}))


def case_no_input_shape(e):
    return e.file(e.chain([e.function("softmax")]))


def case_flatten_first(e):
    return e.file(e.chain([e.function("flatten"), dense(e)]))


def case_dense_after_conv(e):
    return e.file(e.chain([conv(e), dense(e, 2, 4)]))


def case_bn_channels(e):
    return e.file(e.chain([conv(e), bn(e, 3)]))


def case_activation_with_fields(e):
    return e.file(mutate(dense(e), 2, struct_(datatype(["NNlib", "#relu"]), [1])))


def case_softmax_as_activation(e):
    return e.file(mutate(dense(e), 2, e.function("softmax")[0]))


def case_wrong_layer_function(e):
    return e.file(e.chain([dense(e), (struct_(datatype(["Main", "Base", "#exit"]), []), None)]))


def case_dropout_p_nan(e):
    return in_chain(e, mutate(e.dropout(0.5), 0, float("nan")))


def case_empty_dense(e):
    return e.file(e.chain([dense(e), e.dense(np.ones((0, 2), F32), np.zeros(0, F32))]))


def case_dropout_active_zero(e):
    return in_chain(e, mutate(e.dropout(0.5), 2, 0))      # 0 == False in Python, not in the format


def case_bool_type_parameter(e):
    layer = e.conv(np.ones((3, 2, 4), F32), np.zeros(4, F32))    # a 1-d Conv: N = 1
    layer[0]["type"]["params"][0] = True      # Python's True == 1 must not pass for N
    return e.file(layer)


ACTS = "an allowed activation (elu, gelu, identity, leakyrelu, relu, selu, sigmoid_fast, softplus, tanh, tanh_fast, σ)"
CASES = {
    case_bn_track_stats: "model.layers[2].track_stats: false: Flux would normalise with batch statistics, not stored ones",
    case_bn_negative_variance: "model.layers[2].σ²: negative variance",
    case_bn_chs: "model.layers[2].chs: says 3 channels but μ has 2",
    case_bn_eps: "model.layers[2].ϵ: ϵ=0.0 must be positive",
    case_bn_nan: "model.layers[2].ϵ: non-finite Core.Float32 scalar",
    case_bn_beta_length: "model.layers[2].β: length 3, expected 2 channels like μ",
    case_bn_affine_false_with_beta: "model.layers[2].β: holds an array document; expected nothing (affine=false)",
    case_bn_char: "model.layers[2].momentum: type Core.Char is not on the allowlist",
    case_dropout_p: "model.layers[2].p: p=1.5 outside [0, 1)",
    case_dropout_rng: "model.layers[2].rng: type Random.MersenneTwister is not allowed; expected Random.TaskLocalRNG()",
    case_dropout_dims: "model.layers[2].dims: holds a string; expected a dimension, a tuple of them or :",
    case_conv_groups: "model.groups: groups=3 does not divide the 4 output channels",
    case_conv_rank: "model.weight: rank 6: only 1-, 2- and 3-d convolutions are supported",
    case_conv_stride: "model.stride: tuple (0, 1) has values outside 1..1048576",
    case_conv_pad_length: "model.pad: tuple of 3 integers, expected 2 or 4",
    case_conv_stride_not_int: "model.stride[2]: holds the number 1.0; expected an integer",
    case_dense_rank: "model.weight: array of rank 3 (2×3×1), expected rank 2",
    case_dense_bias_length: "model.bias: bias of length 5, expected 2",
    case_dense_bias_dtype: "model.bias: element type float64 differs from the weight's float32",
    case_mixed_dtypes: "model: weights must share one element type, found float32, float64",
    case_zeros_size: "model.bias: Flux.Zeros of size (7,), expected (2,)",
    case_backref_not_int: "model: malformed backref: needs exactly tag and an integer ref",
    case_backref_range: "model: backref 2 outside _backrefs (1..1)",
    case_backrefs_not_array: "_backrefs: must be a BSON array",
    case_named_count: "model.layers: NamedTuple with 1 names for 2 layers",
    case_empty_chain: "model: empty Chain",
    case_vector_param: "model: type parameter 1 is Core.Array{Core.Float32, 1} but the layers are a vector of "
                       "Core.Tuple{Flux.Dense{NNlib.#relu, Core.Array{Core.Float32, 2}, Core.Array{Core.Float32, 1}}, "
                       "NNlib.#softmax}",
    case_array_negative_size: "model.weight: array size must be a list of 1 to 8 non-negative integers",
    case_array_list_data: "model.weight: array data must be raw bytes for a float element type",
    case_pool_params_size: "model.layers[2] (type parameters): integer array of 2 elements needs 16 bytes of data",
    case_datatype_name: "model.σ: datatype name must be a list of 1 to 8 non-empty strings",
    case_datatype_extra_key: "model.σ: datatype with keys ['extra', 'name', 'params', 'tag'], expected "
                             "['name', 'params', 'tag']",
    case_unknown_tag: "model.weight: holds a document with unknown tag 'objectid'; expected a float array",
    case_unionall: f"model.σ: holds a unionall document; expected {ACTS}",
    case_untagged: "model.weight: holds an untagged document; expected a float array",
    case_no_input_shape: "model: cannot tell the input shape: no Dense, Conv or pooling layer before any flatten",
    case_flatten_first: "model: cannot tell the input shape: no Dense, Conv or pooling layer before any flatten",
    case_dense_after_conv: "model.layers[2]: Dense(4 => 2, relu) needs a (batch, features) input, got shape "
                           "[?, 4, ?, ?]",
    case_bn_channels: "model.layers[2]: BatchNorm(3) needs 3 channels on axis 1, got shape [?, 4, ?, ?]",
    case_activation_with_fields: f"model.σ: holds a value of type NNlib.#relu; expected {ACTS} (a singleton, "
                                 "without fields or type parameters)",
    case_softmax_as_activation: f"model.σ: holds the function NNlib.#softmax; expected {ACTS}",
    case_dropout_p_nan: "model.layers[2].p: non-finite Core.Float64 scalar",
    case_empty_dense: "model.layers[2]: Dense(2 => 0) has an empty weight array",
    case_dropout_active_zero: "model.layers[2].active: holds the number 0; expected nothing or false",
    case_bool_type_parameter: "model (type parameter 1): boolean type parameter true is not expected",
    case_wrong_layer_function: "model.layers[2]: function Base.#exit is not allowed; expected a layer or one of "
                               "softmax, flatten, identity",
}


@pytest.mark.parametrize("build", list(CASES), ids=lambda f: f.__name__.removeprefix("case_"))
def test_refusal(build):
    verdict = scanner.scan_bytes(build(Era("0.13")), "bad.bson")
    assert verdict.status == "refused"
    assert [str(r) for r in verdict.reasons] == [CASES[build]]
