"""Hand-written protobuf wire helpers: the few places sealbox reads or writes the wire itself.

The supervisor never decodes tensors: it reads only a request's routing
fields (`peek_model`, a bounded scan), checks that a worker's response is whole top-level
fields (`check_complete`, the same scan), appends its provenance parameters to it
(`string_parameters`) and wraps it into a stream response (`stream_wrap`), all without
decoding it. Clients and workers append
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
INFER_RESPONSE_PARAMETERS = 4   # ModelInferResponse.parameters: map<string, InferParameter>
STREAM_INFER_RESPONSE = 2    # ModelStreamInferResponse.infer_response
# A map<K, V> field is, on the wire, a repeated message field of entries {K key = 1; V value = 2}.
MAP_KEY, MAP_VALUE = 1, 2
PARAMETER_BOOL = 1           # InferParameter.bool_param (in its oneof)
PARAMETER_STRING = 3         # InferParameter.string_param (in its oneof)

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


# A legitimate ModelInferRequest has 3 + len(parameters) + 2*len(inputs) + len(outputs) top-level
# fields; 4096 is far above anything Triton clients send.
MAX_TOP_LEVEL_FIELDS = 4096
MAX_NAME_BYTES = 256  # model names and versions are short identifiers


class PeekError(ValueError):
    """The request is malformed or pathological (the server answers INVALID_ARGUMENT, fixed text)."""


def peek_model(request: bytes, max_fields: int = MAX_TOP_LEVEL_FIELDS) -> tuple[str, str]:
    """model_name (field 1) and model_version (field 2) of a serialized ModelInferRequest.

    A bounded scan of the TOP-LEVEL fields only: big fields (raw_input_contents, inputs) are
    skipped by their length prefix, so a 60 MiB request costs microseconds, and a "field bomb"
    (millions of 2-byte fields) is refused after `max_fields` fields (~1 ms) instead of costing
    the supervisor ~1 s of CPU per MiB. Nested fields are never looked at (the worker pays for
    them, in its sandbox). Every top-level field is seen, so protobuf's "last one wins" rule
    holds: the name routed on is the name the worker parses. Raises PeekError (a ValueError).
    """
    name, version = _scan(request, max_fields, True)
    try:
        return name.decode("utf-8"), version.decode("utf-8")
    except UnicodeDecodeError:
        raise PeekError("model name is not UTF-8") from None


def check_complete(message: bytes, max_fields: int = MAX_TOP_LEVEL_FIELDS) -> None:
    """Raise PeekError unless `message` is a sequence of whole top-level fields (the same bounded
    scan as peek_model). Bytes appended after a message that passes are parsed as fields of their
    own: no truncated length, varint, fixed field or open group of the message can swallow them."""
    _scan(message, max_fields, False)


def _scan(request: bytes, max_fields: int, pick: bool) -> tuple[bytes, bytes]:
    """Walk the top-level fields; with `pick`, return the raw model name and version."""
    picked = {INFER_REQUEST_MODEL_NAME: b"", INFER_REQUEST_MODEL_VERSION: b""}

    def on_field(field: int, pos: int, length: int, _key: int) -> None:
        if pick and field in picked:
            if length > MAX_NAME_BYTES:
                raise PeekError("model name too long")
            picked[field] = bytes(request[pos:pos + length])

    walk_fields(request, max_fields, on_field)
    return picked[INFER_REQUEST_MODEL_NAME], picked[INFER_REQUEST_MODEL_VERSION]


def walk_fields(message: bytes, max_fields: int, on_len_field) -> None:
    """The one bounded walk over a message's TOP-LEVEL fields: `on_len_field(field, start, length,
    key_start)` for each length-delimited one (its payload, at `start`, is skipped, never decoded; the
    field itself begins at `key_start`). Raises PeekError on a malformed message, after `max_fields`
    fields, or if the message does not end on a field boundary."""
    end = len(message)
    pos = fields = 0
    try:
        while pos < end:
            fields += 1
            if fields > max_fields:
                raise PeekError("too many fields")
            key_start = pos
            key, pos = read_varint(message, pos)
            field, wire = key >> 3, key & 7
            if field == 0:
                raise PeekError("field number 0")
            if wire == WIRE_LEN:
                length, pos = read_varint(message, pos)
                if pos + length > end:
                    raise PeekError("truncated field")
                on_len_field(field, pos, length, key_start)
                pos += length
            elif wire == WIRE_VARINT:
                _, pos = read_varint(message, pos)
            elif wire == WIRE_FIXED64:
                pos += 8
            elif wire == WIRE_FIXED32:
                pos += 4
            else:  # groups (3, 4) and 6, 7 never occur in ModelInferRequest
                raise PeekError(f"unsupported wire type {wire}")
    except PeekError:
        raise
    except ValueError as exc:  # read_varint: the data ended inside a varint
        raise PeekError(str(exc)) from None
    if pos != end:
        raise PeekError("truncated message")


def split_raw_inputs(request, max_fields: int = MAX_TOP_LEVEL_FIELDS) -> tuple[bytes, list[memoryview]]:
    """(the request without its raw_input_contents, those entries as views of `request`, in order) of
    a serialized ModelInferRequest (bytes, or a memoryview of a worker's memfd body).

    For a large request, the worker parses only the rest with protobuf and makes its input arrays
    from the views: protobuf's parse copies every bytes field and reading raw_input_contents copies
    it again (measured 120 + 57 ms for 64 MiB), while a view costs nothing. Protobuf keeps repeated
    entries in wire order and parses the other fields the same wherever they stand, so the rest
    decodes to the same message minus field 7. A field 7 with another wire type stays in the rest
    (protobuf decides about it). The same bounded walk as peek_model: PeekError."""
    view = memoryview(request).cast("B")
    rest, raw = [], []
    kept = 0   # the end of the last raw entry: the rest resumes there

    def on_field(field: int, pos: int, length: int, key_start: int) -> None:
        nonlocal kept
        if field == RAW_INPUT_FIELD:
            rest.append(view[kept:key_start])
            raw.append(view[pos:pos + length])
            kept = pos + length

    walk_fields(view, max_fields, on_field)
    rest.append(view[kept:])
    return b"".join(rest), raw


def stream_wrap(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response = <bytes>} built without decoding them."""
    return length_delimited_header(STREAM_INFER_RESPONSE, len(infer_response)) + infer_response


def string_parameters(field: int, parameters: dict[str, str]) -> bytes:
    """`map<string, InferParameter> field` entries with string values, encoded by hand.

    Each entry is one length-delimited `field` holding {string key = 1; InferParameter value = 2}
    and the InferParameter holds {string string_param = 3}. Appended to a message that passed
    check_complete, these entries override any the message already had for the same keys: for
    map fields protobuf keeps the LAST entry of a key (what the supervisor's provenance relies on).
    """
    out = bytearray()
    for key, value in parameters.items():
        k, v = key.encode("utf-8"), value.encode("utf-8")
        param = length_delimited_header(PARAMETER_STRING, len(v)) + v
        entry = length_delimited_header(MAP_KEY, len(k)) + k + length_delimited_header(MAP_VALUE, len(param)) + param
        out += length_delimited_header(field, len(entry)) + entry
    return bytes(out)


def bool_parameters(field: int, parameters: dict[str, bool]) -> bytes:
    """Like string_parameters, with bool values (InferParameter.bool_param), e.g. Triton's
    triton_final_response on a streamed response."""
    out = bytearray()
    for key, value in parameters.items():
        k = key.encode("utf-8")
        param = encode_varint((PARAMETER_BOOL << 3) | WIRE_VARINT) + encode_varint(int(value))
        entry = length_delimited_header(MAP_KEY, len(k)) + k + length_delimited_header(MAP_VALUE, len(param)) + param
        out += length_delimited_header(field, len(entry)) + entry
    return bytes(out)


def message_options(limit: int) -> list[tuple[str, int]]:
    """gRPC channel/server options raising the 4 MB default message size to `limit` (every hop uses this)."""
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


# Shared-memory references (Triton's system shared-memory extension) ---------------------------------
INFER_REQUEST_INPUTS, INFER_REQUEST_OUTPUTS = 5, 6   # ModelInferRequest.inputs / .outputs
SHM_REGION = b"shared_memory_region"                 # the parameter naming a registered region


# What the supervisor copies out of such a tensor message for protobuf to decode: its name and its
# parameters (InferInputTensor.parameters = 4, InferRequestedOutputTensor.parameters = 2), never its
# contents; a walk of at most MAX_TENSOR_FIELDS fields, at most MAX_SHM_TENSOR_BYTES copied.
TENSOR_NAME = 1
TENSOR_PARAMETERS = {INFER_REQUEST_INPUTS: 4, INFER_REQUEST_OUTPUTS: 2}
MAX_TENSOR_FIELDS = 256
MAX_SHM_TENSOR_BYTES = 64 * 1024


def shared_memory_tensors(request: bytes, max_fields: int = MAX_TOP_LEVEL_FIELDS) -> list[tuple[int, int, bytes]]:
    """(field, index, the tensor's name and parameters fields) of every input (field 5) and requested
    output (field 6) whose message mentions the shared-memory parameter, in request order.

    The same bounded top-level scan as peek_model; a tensor message is looked into only when its bytes
    contain "shared_memory_region", so a request without shared memory costs one substring search
    per tensor message (never over raw_input_contents). Only the tensor's name and parameters are
    copied out (`_name_and_parameters`): the caller decodes them with protobuf on the event loop, so
    whatever else a client packs into the tensor (millions of empty contents entries, say) is never
    decoded there. Raises PeekError.
    """
    found: list[tuple[int, int, bytes]] = []
    counts = {INFER_REQUEST_INPUTS: 0, INFER_REQUEST_OUTPUTS: 0}

    def on_field(field: int, pos: int, length: int, _key: int) -> None:
        if field in counts:
            if request.find(SHM_REGION, pos, pos + length) >= 0:
                kept = _name_and_parameters(request, field, pos, length)
                if SHM_REGION in kept:   # (not when only the tensor's contents mention it)
                    found.append((field, counts[field], kept))
            counts[field] += 1

    walk_fields(request, max_fields, on_field)
    return found


def _name_and_parameters(request: bytes, field: int, pos: int, length: int) -> bytes:
    """The name and parameters fields of the tensor message at request[pos:pos + length], as they are
    on the wire (a valid message of the same type); PeekError past the bounds above."""
    tensor = memoryview(request)[pos:pos + length]
    keep, pieces, size = (TENSOR_NAME, TENSOR_PARAMETERS[field]), [], 0

    def on_field(inner: int, start: int, inner_length: int, key_start: int) -> None:
        nonlocal size
        if inner in keep:
            size += start + inner_length - key_start
            if size > MAX_SHM_TENSOR_BYTES:
                raise PeekError("a shared-memory tensor's name and parameters exceed 64 KiB")
            pieces.append(tensor[key_start:start + inner_length])

    walk_fields(tensor, MAX_TENSOR_FIELDS, on_field)
    return b"".join(pieces)
