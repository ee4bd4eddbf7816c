"""The wire codec: numpy <-> Open Inference Protocol tensors, checked against protobuf's own encoding."""
import numpy as np
import pytest

from sealbox.proto import inference_pb2 as pb
from sealbox.proto import tensors, wire

ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "big_endian_f64": np.arange(6, dtype=">f8").reshape(2, 3),
    "f16": np.linspace(-1, 1, 5, dtype=np.float16),
    "bool": np.array([[True, False], [False, True]]),
    "i8_scalar": np.array(-3, dtype=np.int8),
    "transposed_u16": np.arange(6, dtype=np.uint16).reshape(2, 3).T,
    "empty": np.zeros((0, 4), np.float32),
    "big": np.random.default_rng(0).standard_normal(70_000).astype(np.float32),  # multi-byte length varint
}


def test_request_round_trip_and_equal_to_protobuf_encoding():
    raw = tensors.encode_request("m", ARRAYS, ["out"], version="2")
    request = pb.ModelInferRequest.FromString(raw)
    assert (request.model_name, request.model_version, [o.name for o in request.outputs]) == ("m", "2", ["out"])
    decoded = tensors.request_inputs(request)
    for name, array in ARRAYS.items():
        assert decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], array)
    # The hand-appended raw fields are exactly what protobuf would have written.
    assert pb.ModelInferRequest.FromString(request.SerializeToString()) == request
    assert request.SerializeToString() == raw


def test_response_round_trip():
    raw = tensors.encode_response(pb.ModelInferResponse(model_name="m", id="7"), ARRAYS)
    response = pb.ModelInferResponse.FromString(raw)
    assert response.id == "7" and [o.name for o in response.outputs] == list(ARRAYS)
    assert response.outputs[1].datatype == "FP64" and response.outputs[3].datatype == "BOOL"
    for name, array in tensors.response_outputs(response).items():
        np.testing.assert_array_equal(array, ARRAYS[name])


@pytest.mark.parametrize("shape, contents, message", [
    ([2, 3], b"\0" * 20, "input 'x': 20 bytes of raw contents, shape [2, 3] of FP32 needs 24"),
    ([-1, 3], b"", "input 'x': negative dimension in shape [-1, 3]"),
    ([2**32, 2**32], b"", "input 'x': shape [4294967296, 4294967296] of FP32 is larger than 2147483648 bytes"),
    ([1] * 17, b"\0" * 4, "input 'x': 17 dimensions, at most 16"),
])
def test_malformed_inputs_are_refused(shape, contents, message):
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(contents)
    with pytest.raises(tensors.TensorError) as err:
        tensors.request_inputs(request)
    assert str(err.value) == message


def test_typed_contents_and_unsupported_datatypes():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2])
    tensor.contents.fp32_contents.extend([1.5, -2.0])
    np.testing.assert_array_equal(tensors.request_inputs(request)["x"], np.array([1.5, -2.0], np.float32))
    request.inputs.add(name="s", datatype="STRING", shape=[1])
    with pytest.raises(tensors.TensorError) as err:
        tensors.request_inputs(request)
    assert str(err.value).startswith("input 's': datatype 'STRING' is not supported")


# BYTES and BF16 (issue 14): against the protocol's encoding, and tritonclient's own codec as an independent reference.
STRINGS = np.array([[b"hello", b""], ["w\u00f6rld", b"\x00\xff" * 300]], dtype=object)
STRINGS_AS_BYTES = np.array([[b"hello", b""], ["w\u00f6rld".encode(), b"\x00\xff" * 300]], dtype=object)


def _protocol_bytes(elements) -> bytes:  # the protocol's definition, written out
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def test_bytes_raw_encoding_is_the_protocols_and_tritonclients():
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    raw = tensors.encode_bytes(STRINGS)
    assert raw == _protocol_bytes(STRINGS_AS_BYTES.reshape(-1))
    assert raw == serialize_byte_tensor(STRINGS).item()
    assert list(deserialize_bytes_tensor(raw)) == list(STRINGS_AS_BYTES.reshape(-1))


def test_bytes_and_bf16_round_trip_through_requests_and_responses():
    import ml_dtypes

    bf16 = np.array([[1.0, -2.5, 3.14159], [0.0, 1e30, -1e-30]], dtype=ml_dtypes.bfloat16)
    arrays = {"s": STRINGS, "b": bf16, "one": np.array([b"x"], dtype=object)}
    request = pb.ModelInferRequest.FromString(tensors.encode_request("m", arrays))
    assert [t.datatype for t in request.inputs] == ["BYTES", "BF16", "BYTES"]
    assert request.raw_input_contents[0] == _protocol_bytes(STRINGS_AS_BYTES.reshape(-1))
    # BF16 on the wire: the upper 16 bits of each float32, little-endian.
    upper = (bf16.astype(np.float32).view("<u4") >> 16).astype("<u2")
    assert request.raw_input_contents[1] == upper.tobytes()
    decoded = tensors.request_inputs(request)
    assert decoded["s"].dtype == object and decoded["s"].tolist() == STRINGS_AS_BYTES.tolist()
    assert decoded["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(decoded["b"].view(np.uint16), bf16.view(np.uint16))
    response = pb.ModelInferResponse.FromString(tensors.encode_response(pb.ModelInferResponse(), arrays))
    outputs = tensors.response_outputs(response)
    assert outputs["s"].tolist() == STRINGS_AS_BYTES.tolist() and outputs["one"].tolist() == [b"x"]
    np.testing.assert_array_equal(outputs["b"].view(np.uint16), bf16.view(np.uint16))


def test_typed_bytes_contents():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="s", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"ab", b"c"])
    decoded = tensors.request_inputs(request)["s"]
    assert decoded.dtype == object and decoded.tolist() == [b"ab", b"c"]


@pytest.mark.parametrize("shape, contents, message", [
    ([2], _protocol_bytes([b"ab"]), "input 's': BYTES contents end inside the length of element 1 of 2"),
    ([1], b"\x05\x00\x00\x00abc", "input 's': BYTES element 0 declares 5 bytes, only 3 remain"),
    ([1], _protocol_bytes([b"ab"]) + b"!", "input 's': 1 bytes after the last of 1 BYTES elements"),
    ([1], b"\x01\x00", "input 's': BYTES contents end inside the length of element 0 of 1"),
])
def test_malformed_bytes_are_refused(shape, contents, message):
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="s", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(contents)
    with pytest.raises(tensors.TensorError) as err:
        tensors.request_inputs(request)
    assert str(err.value) == message


def test_bf16_only_travels_raw():
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="b", datatype="BF16", shape=[1])
    with pytest.raises(tensors.TensorError) as err:
        tensors.request_inputs(request)
    assert str(err.value) == "input 'b': datatype BF16 only travels as raw contents"


# ---- the worker's split of a large request: raw inputs as views, the rest parsed by protobuf ----------
def _split_decoded(raw: bytes) -> tuple[pb.ModelInferRequest, dict]:
    rest, views = wire.split_raw_inputs(raw)
    request = pb.ModelInferRequest.FromString(rest)
    assert not request.raw_input_contents
    return request, tensors.request_inputs(request, raw=views)


def test_split_raw_inputs_decodes_as_protobuf_does():
    raw = tensors.encode_request("m", ARRAYS, ["out"], version="2")
    request, decoded = _split_decoded(raw)
    whole = pb.ModelInferRequest.FromString(raw)
    del whole.raw_input_contents[:]
    assert request == whole   # every other field, the same
    for name, array in ARRAYS.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert decoded[name].shape == array.shape


def test_split_raw_inputs_views_the_request_and_keeps_wire_order():
    # raw entries BEFORE the inputs that name them, a field in between, and a length varint padded
    # to more bytes than needed (valid protobuf): the views are exact slices, in wire order.
    a, b = np.arange(4, dtype=np.float32), np.arange(4, 8, dtype=np.float32)
    padded = bytes([(wire.RAW_INPUT_FIELD << 3) | wire.WIRE_LEN, 0x90, 0x80, 0x00]) + b.tobytes()   # 16, 3 bytes
    head = pb.ModelInferRequest(model_name="m")
    head.inputs.add(name="a", datatype="FP32", shape=[4])
    head.inputs.add(name="b", datatype="FP32", shape=[4])
    raw = bytearray(wire.length_delimited_header(wire.RAW_INPUT_FIELD, 16) + a.tobytes()
                    + pb.ModelInferRequest(id="between").SerializeToString() + padded + head.SerializeToString())
    rest, views = wire.split_raw_inputs(raw)
    assert [bytes(v) for v in views] == [a.tobytes(), b.tobytes()]
    request = pb.ModelInferRequest.FromString(rest)
    assert (request.model_name, request.id, [t.name for t in request.inputs]) == ("m", "between", ["a", "b"])
    decoded = tensors.request_inputs(request, raw=views)
    np.testing.assert_array_equal(decoded["b"], b)
    b_end = len(raw) - len(head.SerializeToString())
    raw[b_end - 4:b_end] = np.float32(-1).tobytes()   # b's last element, in the request's bytes
    assert decoded["b"][-1] == -1   # a view of the request's bytes, not a copy


def test_split_raw_inputs_leaves_a_field_7_of_another_wire_type_to_protobuf():
    raw = tensors.encode_request("m", {"x": np.ones(2, np.float32)}) + bytes([wire.RAW_INPUT_FIELD << 3, 5])
    rest, views = wire.split_raw_inputs(raw)
    assert len(views) == 1 and rest.endswith(bytes([wire.RAW_INPUT_FIELD << 3, 5]))


@pytest.mark.parametrize("tail, why", [
    (bytes([(wire.RAW_INPUT_FIELD << 3) | wire.WIRE_LEN, 9, 0]), "truncated field"),
    (bytes([(wire.RAW_INPUT_FIELD << 3) | wire.WIRE_LEN, 0x80]), "truncated varint"),
    (bytes([(wire.RAW_INPUT_FIELD << 3) | 3]), "unsupported wire type 3"),
])
def test_split_raw_inputs_refuses_a_malformed_request(tail, why):
    with pytest.raises(wire.PeekError) as err:
        wire.split_raw_inputs(tensors.encode_request("m", {"x": np.ones(2, np.float32)}) + tail)
    assert str(err.value) == why
