"""Hand-written protobuf wire helpers: the few places sealbox reads or writes the wire itself.

The supervisor never decodes tensors: it reads only a request's routing
fields (`peek_model`) and wraps a worker's response bytes into a stream
response without decoding them (`stream_wrap`). Clients and workers append
large raw tensor bytes as length-delimited fields by hand (`length_delimited`),
because protobuf's own serializer copies big bytes fields slowly. Protobuf
allows fields in any order and repeated fields to be split, so appending
is valid encoding.
"""
from __future__ import annotations

# Field numbers (proto/inference.proto).
INFER_REQUEST_MODEL_NAME, INFER_REQUEST_MODEL_VERSION = 1, 2
RAW_INPUT_FIELD = 7          # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6         # ModelInferResponse.raw_output_contents
STREAM_INFER_RESPONSE = 2    # ModelStreamInferResponse.infer_response

WIRE_VARINT, WIRE_FIXED64, WIRE_LEN, WIRE_FIXED32 = 0, 1, 2, 5


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); ValueError if the data ends inside it or it exceeds 64 bits."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def length_delimited_header(field: int, length: int) -> bytes:
    """The key and length of a length-delimited field; its payload follows."""
    return encode_varint((field << 3) | WIRE_LEN) + encode_varint(length)


def peek_model(request: bytes) -> tuple[str, str]:
    """model_name (field 1) and model_version (field 2) of a serialized ModelInferRequest."""
    name = version = ""
    pos = 0
    while pos < len(request):
        key, pos = read_varint(request, pos)
        field, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            _, pos = read_varint(request, pos)
        elif wire == WIRE_LEN:
            length, pos = read_varint(request, pos)
            if pos + length > len(request):
                raise ValueError("truncated field")
            if field in (INFER_REQUEST_MODEL_NAME, INFER_REQUEST_MODEL_VERSION):
                text = request[pos:pos + length].decode("utf-8")
                name, version = (text, version) if field == INFER_REQUEST_MODEL_NAME else (name, text)
            pos += length
        elif wire == WIRE_FIXED64:
            pos += 8
        elif wire == WIRE_FIXED32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != len(request):
        raise ValueError("truncated message")
    return name, version


def stream_wrap(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response = <bytes>} built without decoding them."""
    return length_delimited_header(STREAM_INFER_RESPONSE, len(infer_response)) + infer_response


def message_options(limit: int) -> list[tuple[str, int]]:
    """gRPC channel/server options raising the 4 MB default message size to `limit` (every hop uses this)."""
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
