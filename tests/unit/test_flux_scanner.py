"""The Flux/BSON.jl scanner: real files from the corpus, hostile files, strict BSON."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from tests.support import SHARED

from tests.support.flux import Era, Pairs, backref, datatype, encode, struct_, tuple_
from sealbox.worker.engine import TensorSpec
from sealbox.worker.flux import bson, scanner
from sealbox.worker.flux.native_engine import FluxNativeEngine

CORPUS = SHARED / "corpus" / "bsonjl"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus of real BSON.jl files not found at {CORPUS}")

# file -> (status, the first reason, why)
CORPUS_VERDICTS = {
    "sebkaz+Julia_Deploy/02_Docker_app_nn_model.3630b035.bson": ("accepted", None, "Chain of two Dense, Flux 0.13"),
    "Xiaocao-Cxh+PowerModel/model.d2d83e9f.bson": ("accepted", None, "Chain of 7 Dense, Flux 0.14"),
    "arcAman07+HousePredicto_Models/mymodel.ebe3b9f8.bson": ("accepted", None, "a bare Dense"),
    "banachtech+replicator/model.6f42a183.bson": ("accepted", None, "Conv/BatchNorm/Dropout/MaxPool/flatten"),
    "DhairyaLGandhi+JuliaCon2020_dash/model_conv.7d17a1f4.bson": (
        "refused", "model.layers[7]: serialized closure (jl_anonymous): code in the model file",
        "the x -> reshape(x, :, size(x, 4)) layer is lowered Julia code"),
    "DhairyaLGandhi+JuliaCon2020_dash/mnist_conv.6fa959ed.bson": (
        "not-a-model", "top: no Flux model at the top level (keys: acc, epoch_idx, params): weights or other data only",
        "weights only: a vector of arrays"),
    "Dunque+BlockRecognizer/mymodel.50ab89e9.bson": (
        "refused", "top: no Flux model at the top level (keys: weights): weights or other data only",
        "weights only, as Zygote.Params (an IdDict inside): not plain data"),
    "sebkaz+Julia_Deploy/02_Docker_app_Docker_reg.732b1d23.bson": (
        "refused", "top: no Flux model at the top level (keys: reg): weights or other data only",
        "a GLM regression model, not Flux"),
    "JuliaIO_BSON.jl/test.bson": (
        "refused", "top: no Flux model at the top level (keys: a, b): weights or other data only",
        "an array of Complex{Int64}: element type outside the allowlist"),
    "JuliaIO_BSON.jl/test_41_from_32bit.bson": (
        "refused", "top: no Flux model at the top level (keys: obj): weights or other data only",
        "a Dict: building it calls hash/isequal on file data"),
    "JuliaIO_BSON.jl/test_41_from_64bit.bson": (
        "refused", "top: no Flux model at the top level (keys: obj): weights or other data only",
        "a Dict"),
    "JuliaIO_BSON.jl/test_MultiDimsArray_from_64bit.bson": (
        "not-a-model", "top: no Flux model at the top level (keys: a): weights or other data only",
        "a lone Float32 matrix"),
}
# the further reason each refused non-model file must carry
CORPUS_SECOND_REASONS = {
    "Dunque+BlockRecognizer/mymodel.50ab89e9.bson":
        "weights: holds a value of type Zygote.Params; expected plain data (numbers, strings, float arrays)",
    "sebkaz+Julia_Deploy/02_Docker_app_Docker_reg.732b1d23.bson":
        "reg: holds a value of type StatsModels.TableRegressionModel; expected plain data (numbers, strings, "
        "float arrays)",
    "JuliaIO_BSON.jl/test.bson": "a (element type): type Base.Complex is not on the allowlist",
    "JuliaIO_BSON.jl/test_41_from_32bit.bson":
        "obj: holds a value of type Base.Dict; expected plain data (numbers, strings, float arrays)",
    "JuliaIO_BSON.jl/test_41_from_64bit.bson":
        "obj: holds a value of type Base.Dict; expected plain data (numbers, strings, float arrays)",
}


@needs_corpus
def test_every_corpus_file_is_in_the_table():
    found = {str(p.relative_to(CORPUS)) for p in CORPUS.glob("*/*.bson")}
    assert found == set(CORPUS_VERDICTS)


@needs_corpus
@pytest.mark.parametrize("name", sorted(CORPUS_VERDICTS))
def test_corpus_verdict(name):
    status, first, _why = CORPUS_VERDICTS[name]
    verdict = scanner.scan_file(CORPUS / name, name)
    assert verdict.status == status, [str(r) for r in verdict.reasons]
    if status == "accepted":
        assert verdict.reasons == () and verdict.model is not None
    else:
        assert verdict.model is None
        assert str(verdict.reasons[0]) == first
        if name in CORPUS_SECOND_REASONS:
            assert str(verdict.reasons[1]) == CORPUS_SECOND_REASONS[name]


@needs_corpus
def test_closure_file_also_names_the_code_inside():
    verdict = scanner.scan_file(CORPUS / "DhairyaLGandhi+JuliaCon2020_dash/model_conv.7d17a1f4.bson")
    text = [str(r) for r in verdict.reasons]
    assert "_backrefs[15].data[11][2][1].data[1]: module reference (ref Main): resolves any global by name" in text
    assert "_backrefs[6]: type Core.Expr is not on the allowlist" in text
    assert "_backrefs[15]: backref cycle: _backrefs[15] -> _backrefs[15]" in text


@needs_corpus
def test_corpus_architectures():
    described = {
        "sebkaz+Julia_Deploy/02_Docker_app_nn_model.3630b035.bson": [
            "model.layers[1]: Dense(13 => 42, relu)", "model.layers[2]: Dense(42 => 1)",
            "input [-1, 13] FP32 -> output [-1, 1] FP32"],
        "arcAman07+HousePredicto_Models/mymodel.ebe3b9f8.bson": [
            "model: Dense(13 => 1)", "input [-1, 13] FP32 -> output [-1, 1] FP32"],
        "banachtech+replicator/model.6f42a183.bson": [
            "model.layers[1]: Conv((2, 2), 1 => 2, relu, pad=(1, 0, 1, 0))", "model.layers[2]: BatchNorm(2)",
            "model.layers[3]: Dropout(0.5)", "model.layers[4]: MaxPool((2, 2))",
            "model.layers[5]: Conv((2, 2), 2 => 4, relu, pad=(1, 0, 1, 0))", "model.layers[6]: BatchNorm(4)",
            "model.layers[7]: Dropout(0.5)", "model.layers[8]: MaxPool((2, 2))", "model.layers[9]: flatten",
            "model.layers[10]: Dense(336 => 30, relu)", "model.layers[11]: softmax",
            "input [-1, 1, -1, -1] FP32 -> output [-1, 30] FP32"],
    }
    for name, lines in described.items():
        assert scanner.scan_file(CORPUS / name).model.describe() == lines
    power = scanner.scan_file(CORPUS / "Xiaocao-Cxh+PowerModel/model.d2d83e9f.bson").model.describe()
    assert power[0] == "model.layers[1]: Dense(184 => 184, relu)" and power[6] == "model.layers[7]: Dense(50 => 1, σ)"


@needs_corpus
@pytest.mark.parametrize("name, batch, inputs, outputs", [
    ("sebkaz+Julia_Deploy/02_Docker_app_nn_model.3630b035.bson", (3, 13), (-1, 13), (-1, 1)),
    ("Xiaocao-Cxh+PowerModel/model.d2d83e9f.bson", (4, 184), (-1, 184), (-1, 1)),
    ("arcAman07+HousePredicto_Models/mymodel.ebe3b9f8.bson", (2, 13), (-1, 13), (-1, 1)),
    # two MaxPool(2) then 4 channels must give 336 features: 7 x 12 after pooling
    ("banachtech+replicator/model.6f42a183.bson", (2, 1, 28, 48), (-1, 1, -1, -1), (-1, 30)),
])
def test_corpus_models_run(name, batch, inputs, outputs):
    engine = FluxNativeEngine.load({"model.bson": str(CORPUS / name)})
    assert engine.inputs == (TensorSpec("input", "FP32", inputs),)
    assert engine.outputs == (TensorSpec("output", "FP32", outputs),)
    out = engine.infer({"input": np.random.default_rng(1).standard_normal(batch).astype(np.float32)})["output"]
    assert out.shape == (batch[0], outputs[1]) and out.dtype == np.float32
    assert np.isfinite(out).all()
    if "banachtech" in name:      # ends in softmax
        np.testing.assert_allclose(out.sum(axis=1), 1, rtol=1e-5)
    empty = engine.infer({"input": np.zeros((0,) + batch[1:], np.float32)})["output"]
    assert empty.shape == (0, outputs[1])


# ---------------------------------------------------------------- hostile files

def scan(data: bytes) -> scanner.Verdict:
    return scanner.scan_bytes(data, "hostile.bson")


def reasons(verdict) -> list[str]:
    return [str(r) for r in verdict.reasons]


def small_dense(era: Era, act="relu"):
    return era.dense(np.ones((2, 3), np.float32), np.zeros(2, np.float32), act)


def closure_layer(era: Era) -> dict:
    """A lambda as BSON.jl stores it: a struct whose type is jl_anonymous with a TypeName holding a Method."""
    method = struct_(era.core_type("Method"), [{"tag": "ref", "path": ["Main"]}, {"tag": "symbol", "name": "#3"}])
    typename = struct_(era.core_type("TypeName"), ["1.9.3", {"tag": "symbol", "name": "#3#4"}, [method]])
    return struct_({"tag": "jl_anonymous", "typename": typename, "params": []}, [])


def test_closure_layer():
    e = Era("0.13")
    closure = closure_layer(e)
    model = e.chain([small_dense(e), (closure, closure["type"])])
    assert reasons(scan(e.file(model))) == [
        "model.layers[2]: serialized closure (jl_anonymous): code in the model file"]


def test_closure_in_an_activation_slot():
    e = Era("0.13")
    dense, _ = small_dense(e)
    dense["data"][2] = closure_layer(e)
    assert reasons(scan(e.file(dense))) == ["model.σ: serialized closure (jl_anonymous): code in the model file"]


ALLOWED = "an allowed activation (elu, gelu, identity, leakyrelu, relu, selu, sigmoid_fast, softplus, tanh, " \
          "tanh_fast, σ)"


def test_gadget_in_activation_slot_base_run():
    e = Era("0.13")
    dense, _ = small_dense(e)
    run = datatype(["Main", "Base", "#run"])
    dense["data"][2] = struct_(run, [])
    dense["type"]["params"][0] = run            # a consistent type, so only the allowlist stops it
    verdict = scan(e.file(dense))
    assert verdict.status == "refused"
    assert reasons(verdict) == [f"model.σ: function Base.#run is not allowed; expected {ALLOWED}"]


def test_gadget_composed_callable():
    """Base.Fix1(run, cmd): no closure, no code, still a process spawn on the first forward pass."""
    e = Era("0.13")
    dense, _ = small_dense(e)
    fix = datatype(["Main", "Base", "Fix1"], [datatype(["Main", "Base", "#run"]), datatype(["Main", "Base", "Cmd"])])
    dense["data"][2] = struct_(fix, [struct_(datatype(["Main", "Base", "#run"]), []), "cat /etc/passwd"])
    assert reasons(scan(e.file(dense))) == [f"model.σ: type Base.Fix1 is not allowed; expected {ALLOWED}"]


def test_activation_as_a_whole_layer():
    e = Era("0.13")
    model = e.chain([small_dense(e), e.function("relu")])
    assert reasons(scan(e.file(model))) == [
        "model.layers[2]: the activation NNlib.#relu as a whole layer: Julia refuses activations on arrays "
        "(it needs broadcasting)"]


def test_module_reference():
    e = Era("0.13")
    dense, _ = small_dense(e)
    dense["data"][2] = {"tag": "ref", "path": ["Main", "Base"]}
    assert reasons(scan(e.file(dense))) == [
        "model.σ: module reference (ref Main.Base): resolves any global by name"]
    # also outside the model: every top-level value is raised by BSON.load
    verdict = scan(e.file(small_dense(e), extra={"note": {"tag": "ref", "path": ["Main"]}}))
    assert reasons(verdict) == ["note: module reference (ref Main): resolves any global by name"]


def test_forged_struct_with_a_pointer_field():
    e = Era("0.13")
    dense, _ = small_dense(e)
    ptr = struct_(datatype(["Core", "Ptr"], [datatype(["Core", "Nothing"])]), b"\x00\x10\x40\x00\x00\x00\x00\x00")
    dense["data"][1] = struct_(datatype(["Main", "Forged"]), [ptr])
    assert reasons(scan(e.file(dense))) == [
        "model.bias.data[1].type: raw pointer type (Core.Ptr): forged pointers are never allowed"]
    # a bare primitive Ptr where a weight belongs
    dense["data"][0] = ptr
    dense["data"][1] = e.array(np.zeros(2, np.float32))
    assert reasons(scan(e.file(dense))) == [
        "model.weight.type: raw pointer type (Core.Ptr): forged pointers are never allowed"]


def test_duplicate_key_with_two_readings():
    e = Era("0.13")
    harmless, _ = small_dense(e)
    evil, _ = small_dense(e)
    evil["data"][2] = struct_(datatype(["Main", "Base", "#run"]), [])
    doc = encode(Pairs([("model", harmless), ("model", evil), ("_backrefs", e.backrefs)]))
    first = encode(Pairs([("model", harmless), ("_backrefs", e.backrefs)]))
    assert scan(first).status == "accepted"     # a first-wins reader would see this one; BSON.jl the other
    second = len(encode(Pairs([("model", harmless)]))) - 1     # where the second "model" element starts
    assert reasons(scan(doc)) == [
        f"hostile.bson: bson: byte {second} (top): duplicate key 'model': BSON.jl keeps the last one, other readers the first"]


def test_length_lies():
    e = Era("0.13")
    good = e.file(small_dense(e))
    too_long = struct.pack("<i", len(good) + 8) + good[4:] + b"\x00" * 8
    assert reasons(scan(too_long)) == [
        f"hostile.bson: bson: byte 0 (top): document declares {len(good) + 8} bytes but its elements end "
        f"after {len(good)}"]
    too_short = struct.pack("<i", len(good) - 1) + good[4:]
    assert scan(too_short).status == "refused"
    assert reasons(scan(too_short))[0].startswith("hostile.bson: bson: byte ")
    # an inner document that claims fewer bytes than it has
    inner = encode({"a": {"x": 1.0}})
    lie = bytearray(inner)
    struct.pack_into("<i", lie, 7, struct.unpack_from("<i", lie, 7)[0] - 1)
    assert reasons(scan(bytes(lie))) == [
        "hostile.bson: bson: byte 22 (top/a): document declared 15 bytes long ends without its 0x00 terminator"]


def test_backref_cycle():
    e = Era("0.13")
    dense, _ = small_dense(e)
    # the Dense type refers to itself through its first type parameter
    dense["type"] = backref(1)
    looped = datatype(["Flux", "Dense"], [backref(1), e.array_type(np.float32, 2), e.array_type(np.float32, 1)])
    e.backrefs.insert(0, looped)
    e.backrefs[:] = [looped] + e.backrefs[1:]
    dense["type"]["ref"] = 1
    data = e.file(dense)
    got = reasons(scan(data))
    assert "_backrefs[1]: backref cycle: _backrefs[1] -> _backrefs[1]" in got
    assert got[0].startswith("model (type parameter 1.1.1.1.")
    assert got[0].endswith("): types or layers nested deeper than 64 levels")


def test_backref_alias_loop():
    doc = {"model": backref(1), "_backrefs": [backref(2), backref(1)]}
    assert reasons(scan(encode(doc))) == [
        "_backrefs[1]: backref cycle: the entry refers to itself through backrefs only"]


def test_billion_laughs_dag():
    levels = 40          # 2**40 nodes once expanded, 80 backrefs on disk
    entries = [tuple_(backref(i + 2), backref(i + 2)) for i in range(levels)] + [1.0]
    doc = {"model": backref(1), "_backrefs": entries}
    assert reasons(scan(encode(doc))) == [
        f"_backrefs: backrefs expand the file to more than {scanner.MAX_EXPANDED_NODES} nodes (a billion-laughs DAG)"]


def test_deep_nesting():
    depth = 10_000
    body = encode({})
    for _ in range(depth):      # {"a": {"a": ... }}
        inner = b"\x03a\x00" + body
        body = struct.pack("<i", len(inner) + 5) + inner + b"\x00"
    # each level is 7 bytes (length, type byte, key "a"); level 101 is the first too deep
    assert reasons(scan(body)) == [f"hostile.bson: bson: byte {7 * bson.MAX_DEPTH} (top{'/a' * bson.MAX_DEPTH}): "
                                   f"nesting deeper than {bson.MAX_DEPTH} levels"]


def test_array_size_does_not_match_bytes():
    e = Era("0.13")
    dense, _ = small_dense(e)
    dense["data"][0]["size"] = [10, 10]
    assert reasons(scan(e.file(dense))) == [
        "model.weight: array of size 10×10 Core.Float32 needs 400 bytes, data has 24"]


def test_zero_size_element_type_with_enormous_size():
    e = Era("0.13")
    dense, _ = small_dense(e)
    dense["data"][0] = {"tag": "array", "type": datatype(["Core", "Nothing"]), "size": [1 << 31, 1 << 31],
                        "data": b""}
    assert reasons(scan(e.file(dense))) == [
        "model.weight: array element type Core.Nothing is not allowed (a zero-size element type: BSON.jl would "
        "call its constructor and fill 4611686018427387904 elements); expected Float32, Float64 or Float16"]
    # the same as a plain top-level value
    verdict = scan(encode({"x": dense["data"][0]}))
    assert verdict.status == "refused" and "x: array element type Core.Nothing is not allowed" in reasons(verdict)[1]


# ---------------------------------------------------------------- schema and type cross-checks

def test_type_parameter_must_match_the_activation():
    e = Era("0.13")
    dense, _ = small_dense(e, "relu")
    dense["data"][2] = e.function("tanh")[0]
    assert reasons(scan(e.file(dense))) == [
        "model: type parameter 1 (σ) is NNlib.#relu but the data says Base.#tanh"]


def test_conv_type_parameters_must_match_data():
    e = Era("0.13")
    conv, _ = e.conv(np.ones((3, 3, 1, 2), np.float32), np.zeros(2, np.float32), pad=(1, 1, 1, 1))
    conv["type"]["params"][1] = 2           # M says 2 pad values, the data has 4
    assert reasons(scan(e.file(conv))) == ["model: type parameter 2 (M, pad length) is 2 but the data says 4"]


def test_maxpool_type_parameters_must_match_data():
    e = Era("0.13")
    pool, _ = e.pool("MaxPool", (2, 2))
    pool["type"]["params"] = e.int_params(3, 6)
    assert reasons(scan(e.file(e.chain([(pool, pool["type"])])))) == [
        "model.layers[1]: type parameter 1 (N, window dimensions) is 3 but the data says 2"]


def test_dense_field_count():
    e = Era("0.13")
    dense, _ = small_dense(e)
    dense["data"].append(1.0)
    assert reasons(scan(e.file(dense))) == [
        "model: Dense with 4 fields and 3 type parameters, expected 3 fields [weight, bias, σ] and 3 type parameters"]


def test_chain_type_must_list_the_layers():
    e = Era("0.13")
    chain, _ = e.chain([small_dense(e), e.function("softmax")])
    chain["type"]["params"][0]["params"].pop()
    assert reasons(scan(e.file(chain))) == [
        "model: type parameter 1 (layers) is Core.Tuple{Flux.Dense{NNlib.#relu, Core.Array{Core.Float32, 2}, "
        "Core.Array{Core.Float32, 1}}} but the data says Core.Tuple{Flux.Dense{NNlib.#relu, "
        "Core.Array{Core.Float32, 2}, Core.Array{Core.Float32, 1}}, NNlib.#softmax}"]


def test_training_mode_is_refused():
    e = Era("0.13")
    drop, _ = e.dropout(0.5)
    drop["data"][2] = True
    bn, _ = e.batchnorm(np.zeros(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.float32),
                        np.ones(2, np.float32))
    bn["data"][9] = True
    model = e.chain([small_dense(e), (drop, drop["type"]), (bn, bn["type"])])
    assert reasons(scan(e.file(model))) == [
        "model.layers[2].active: true: saved in training mode, Flux would drop values at random",
        "model.layers[3].active: true: saved in training mode, Flux would use batch statistics"]


def test_unsupported_layer_and_foreign_struct():
    e = Era("0.13")
    skip = struct_(datatype(["Flux", "SkipConnection"], []), [])
    foreign = struct_(datatype(["Main", "MyLayer"], []), [])
    model = e.chain([small_dense(e), (skip, skip["type"]), (foreign, foreign["type"])])
    assert reasons(scan(e.file(model))) == [
        "model.layers[2]: type Flux.SkipConnection is not on the allowlist",
        "model.layers[3]: type Main.MyLayer is not on the allowlist"]


def test_shapes_must_chain():
    e = Era("0.13")
    model = e.chain([small_dense(e), e.dense(np.ones((1, 5), np.float32), np.zeros(1, np.float32))])
    assert reasons(scan(e.file(model))) == [
        "model.layers[2]: Dense(5 => 1) needs 5 input features, got 2 (shape [?, 2])"]


def test_two_models_and_top_level_tag():
    e = Era("0.13")
    a, _ = small_dense(e)
    data = encode({"a": a, "b": a, "_backrefs": e.backrefs})
    assert reasons(scan(data)) == ["top: 2 Flux models (a, b): cannot tell which one to serve"]
    assert reasons(scan(encode({"tag": "struct", "model": a}))) == [
        "top: key 'tag' at the top level would make BSON.jl read the whole file as one tagged value"]


def test_extra_plain_data_is_allowed():
    e = Era("0.13")
    data = e.file(small_dense(e), extra={"epoch": 3, "acc": 0.9, "note": "hi", "loss": e.array(np.zeros(4))})
    verdict = scan(data)
    assert verdict.status == "accepted" and verdict.model.key == "model"


# ---------------------------------------------------------------- strict BSON

def bson_error(data: bytes) -> str:
    with pytest.raises(bson.BsonError) as err:
        bson.parse(data)
    return str(err.value)


def test_bson_reads_what_bson_jl_writes():
    doc = bson.parse(encode({"a": [1, 2.5, "x", None, True, b"\x01"], "b": {"c": -3}}))
    assert doc["a"][:5] == [1, 2.5, "x", None, True] and bytes(doc["a"][5]) == b"\x01"
    assert doc["b"] == {"c": -3}


def test_bson_strictness():
    ok = encode({"a": 1})
    assert bson_error(ok + b"\x00") == "bson: byte 16 (top): 1 trailing bytes after the top document"
    # array keys must be "0", "1", ... (BSON.jl ignores them, so they could disagree with position)
    one_based = encode({"a": Pairs([("1", 1)])})
    one_based = one_based.replace(b"\x03a\x00", b"\x04a\x00")
    assert bson_error(one_based) == "bson: byte 11 (top/a): array key '1' where BSON.jl writes '0'"
    objectid = b"\x07a\x00" + b"\x00" * 12
    assert bson_error(struct.pack("<i", len(objectid) + 5) + objectid + b"\x00") == \
        "bson: byte 4 (top): element type 0x07 is not one BSON.jl writes"
    binary = bytearray(encode({"a": b"xy"}))
    binary[11] = 0x80
    assert bson_error(bytes(binary)) == "bson: byte 7 (top/a): binary subtype 0x80; BSON.jl writes only 0x00"
    bad_utf8 = encode({"a": "xy"}).replace(b"xy", b"\xff\xfe")
    assert bson_error(bad_utf8) == "bson: byte 7 (top/a): string is not valid UTF-8"
    bad_key = encode({"ab": 1}).replace(b"ab", b"\xc3(")
    assert bson_error(bad_key) == "bson: byte 5 (top): key is not valid UTF-8"
    flag = bytearray(encode({"a": True}))
    flag[7] = 2
    assert bson_error(bytes(flag)) == "bson: byte 7 (top/a): boolean byte 0x02 is neither 0x00 nor 0x01"
    no_nul = bytearray(encode({"a": "xy"}))
    no_nul[-2] = 0x41       # the string's own NUL; the last byte ends the document
    assert bson_error(bytes(no_nul)) == "bson: byte 7 (top/a): string does not end with its 0x00 byte"
    assert bson_error(b"\x05\x00\x00") == "bson: byte 0 (top): document length runs past the end of the file (3 bytes)"


def test_bson_limits():
    big = encode({"s": "x" * (bson.MAX_STRING_BYTES + 1)})
    assert bson_error(big) == f"bson: byte 7 (top/s): string length {bson.MAX_STRING_BYTES + 2} outside " \
                              f"1..{bson.MAX_STRING_BYTES + 1}"
    many = encode({"a": [None] * (bson.MAX_NODES + 1)})
    assert bson_error(many).endswith(f": more than {bson.MAX_NODES} elements")
    long_key = encode({"k" * (bson.MAX_KEY_BYTES + 1): 1})
    assert bson_error(long_key) == f"bson: byte 5 (top): key longer than {bson.MAX_KEY_BYTES} bytes"


# ---------------------------------------------------------------- mutation robustness

def _seed_models() -> list[dict]:
    out = []
    for era in ("0.10", "0.13"):
        e = Era(era)
        model = e.chain([e.conv(np.ones((2, 2, 1, 2), np.float32), np.zeros(2, np.float32), "relu", pad=(1, 0, 1, 0)),
                         e.batchnorm(np.zeros(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.float32),
                                     np.ones(2, np.float32)),
                         e.dropout(0.5), e.pool("MaxPool", (2, 2)), e.function("flatten"),
                         e.dense(np.ones((3, 8), np.float32), np.zeros(3, np.float32), "tanh"),
                         e.function("softmax")])
        out.append({"model": model[0], "_backrefs": e.backrefs})
    return out


def _all_containers(node, out):
    if isinstance(node, (dict, list)) and node:
        out.append(node)
        for child in (node.values() if isinstance(node, dict) else node):
            _all_containers(child, out)
    return out


def test_mutated_files_get_a_verdict_and_accepted_ones_run():
    """Tree-level mutations of real-shaped models: the scanner never raises, and whatever it
    accepts the evaluator can run on an input of the reported shape."""
    import copy
    import random
    rng = random.Random(5)
    replacements = [None, True, False, 0, -1, 1 << 40, 1.5, float("nan"), "", b"", b"\x00" * 8, [], {},
                    backref(1), backref(3), tuple_(), tuple_(1, 2)]
    seeds = _seed_models()
    statuses = set()
    for _ in range(400):
        doc = copy.deepcopy(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            containers = _all_containers(doc, [])
            target = rng.choice(containers)
            key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
            if rng.random() < 0.6:
                target[key] = copy.deepcopy(rng.choice(replacements))
            else:
                target[key] = copy.deepcopy(rng.choice(containers))
        verdict = scanner.scan_bytes(encode(doc), "mutant.bson")
        statuses.add(verdict.status)
        assert verdict.status in ("accepted", "refused", "not-a-model")
        if verdict.accepted:
            shape = tuple(2 if d == -1 else d for d in verdict.model.input_shape)
            if len(shape) == 4:
                shape = shape[:2] + (6, 6)
            engine = FluxNativeEngine(verdict.file, verdict.model)
            try:
                out = engine.infer({"input": np.zeros(shape, verdict.model.dtype)})["output"]
            except Exception as err:      # only a shape complaint is acceptable here
                assert type(err).__name__ == "InputError", err
            else:
                assert out.shape[0] == 2
        else:
            assert verdict.reasons
    assert {"accepted", "refused"} <= statuses      # the mutations reach both outcomes
