"""Open Inference Protocol tensors <-> numpy arrays (both raw and typed contents).

Raw contents are row-major, little-endian, unpadded. Outputs are always sent
raw: tritonclient's as_numpy() ignores typed contents.

Two datatypes have no plain numpy dtype:
- BYTES: a numpy object array whose elements are `bytes` (str elements are sent UTF-8 encoded), as
  tritonclient holds them. Raw, each element is a 4-byte little-endian length then its bytes, row-major;
  typed, one `bytes_contents` entry per element.
- BF16: numpy arrays of `ml_dtypes.bfloat16` (the bfloat16 numpy dtype JAX and tritonclient use), so a BF16
  tensor stays distinct from UINT16 and is never widened on the wire. BF16 only travels raw.
"""
from __future__ import annotations

import struct

import ml_dtypes
import numpy as np

from . import inference_pb2 as pb
from .wire import RAW_INPUT_FIELD, RAW_OUTPUT_FIELD, length_delimited_header

DATATYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "BYTES": np.dtype(object),
}
# Which typed-contents field carries each datatype (FP16/BF16 only travel raw).
TYPED_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
MAX_DIMS = 16
MAX_TENSOR_BYTES = 2**31  # above gRPC's own message limit: no valid request carries more


class TensorError(ValueError):
    """A tensor in a request is malformed (INVALID_ARGUMENT)."""


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in "SUO":  # bytes, str and object arrays travel as BYTES
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if array.dtype.newbyteorder("<") == dtype or array.dtype == dtype:
            return name
    raise TensorError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")


def _shape(name: str, shape) -> tuple[int, ...]:
    if len(shape) > MAX_DIMS:
        raise TensorError(f"input '{name}': {len(shape)} dimensions, at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise TensorError(f"input '{name}': negative dimension in shape {list(shape)}")
    return tuple(int(d) for d in shape)


SHM_REGION = "shared_memory_region"   # an input or output naming a client's registered region


def request_inputs(request: pb.ModelInferRequest, shared=(), raw=None) -> dict[str, np.ndarray]:
    """Decode every input of a request into a numpy array (read-only views of raw bytes).

    shared: the bytes of the inputs that name a shared-memory region, in request order (the worker
    gets them as sealed copies attached to the call, proto/hop.py); the other inputs take the
    raw_input_contents entries in order, as tritonclient sends them: the request's own, or `raw` when
    the caller split them off before parsing (wire.split_raw_inputs)."""
    in_shm = [SHM_REGION in tensor.parameters for tensor in request.inputs]
    if sum(in_shm) != len(shared):
        raise TensorError(f"{sum(in_shm)} inputs name a shared-memory region, {len(shared)} were attached")
    if raw is None:
        raw = request.raw_input_contents
    if raw and len(raw) != len(in_shm) - sum(in_shm):
        raise TensorError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs) - sum(in_shm)} inputs")
    shared, raw_entries = iter(shared), iter(raw)
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise TensorError(f"input '{name}' given twice")
        dtype = DATATYPES.get(tensor.datatype)
        if dtype is None:
            raise TensorError(f"input '{name}': datatype {tensor.datatype!r} is not supported "
                              f"(supported: {', '.join(DATATYPES)})")
        shape = _shape(name, tensor.shape)
        count = 1
        for dim in shape:  # Python ints: no int64 wrap-around to a small count
            count *= dim
        if dtype.kind != "O" and count * dtype.itemsize > MAX_TENSOR_BYTES:
            raise TensorError(f"input '{name}': shape {list(shape)} of {tensor.datatype} is larger than "
                              f"{MAX_TENSOR_BYTES} bytes")
        if in_shm[index] or raw:
            if tensor.HasField("contents"):
                raise TensorError(f"input '{name}': both {'shared-memory' if in_shm[index] else 'raw'} and "
                                  "typed contents given")
            data = next(shared) if in_shm[index] else next(raw_entries)
            if tensor.datatype == "BYTES":
                array = decode_bytes(data, count, f"input '{name}'").reshape(shape)
            elif len(data) != count * dtype.itemsize:
                raise TensorError(f"input '{name}': {len(data)} bytes of {'shared-memory' if in_shm[index] else 'raw'} contents, shape {list(shape)} "
                                  f"of {tensor.datatype} needs {count * dtype.itemsize}")
            else:
                array = np.frombuffer(data, dtype=dtype).reshape(shape)
        else:
            field = TYPED_FIELD.get(tensor.datatype)
            if field is None:
                raise TensorError(f"input '{name}': datatype {tensor.datatype} only travels as raw contents")
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise TensorError(f"input '{name}': {len(values)} values in {field}, shape {list(shape)} "
                                  f"needs {count}")
            array = _typed_array(values, dtype, shape)
        arrays[name] = array
    return arrays


def _typed_array(values, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype.kind != "O":
        return np.asarray(values, dtype=dtype).reshape(shape)
    array = np.empty(len(values), dtype=object)  # element by element: numpy would make a bytes_ array
    array[:] = list(values)
    return array.reshape(shape)


def decode_bytes(data: bytes, count: int, what: str) -> np.ndarray:
    """The raw BYTES encoding of `count` elements -> a flat object array of bytes; every byte accounted for."""
    out = np.empty(count, dtype=object)
    view, offset = memoryview(data), 0
    for i in range(count):
        if offset + 4 > len(view):
            raise TensorError(f"{what}: BYTES contents end inside the length of element {i} of {count}")
        (size,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if size > len(view) - offset:
            raise TensorError(f"{what}: BYTES element {i} declares {size} bytes, only {len(view) - offset} remain")
        out[i] = bytes(view[offset:offset + size])
        offset += size
    if offset != len(view):
        raise TensorError(f"{what}: {len(view) - offset} bytes after the last of {count} BYTES elements")
    return out


def _element_bytes(value) -> bytes:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    if isinstance(value, (str, np.str_)):
        return str(value).encode("utf-8")
    raise TensorError(f"a BYTES element must be bytes or str, not {type(value).__name__}")


def encode_bytes(array: np.ndarray) -> bytes:
    """An array of bytes/str elements in the raw BYTES encoding (4-byte little-endian length, then the bytes)."""
    parts = []
    for value in np.asarray(array, dtype=object).reshape(-1):
        data = _element_bytes(value)
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def _raw_field(number: int, array: np.ndarray) -> list:
    """One length-delimited protobuf field holding the array's bytes, as [header, buffer]."""
    if array.dtype.kind == "O":
        data = memoryview(encode_bytes(array))
    else:
        data = memoryview(np.require(array, requirements="C").reshape(-1).view(np.uint8))
    return [length_delimited_header(number, data.nbytes), data]


def raw_bytes(array: np.ndarray) -> memoryview:
    """An output's raw contents as the protocol lays them out (what a shared-memory output region gets)."""
    return _raw_field(RAW_OUTPUT_FIELD, _wire_array(array)[1])[1]


def _wire_array(array: np.ndarray) -> tuple[str, np.ndarray]:
    datatype = datatype_of(array)
    if datatype == "BYTES":
        return datatype, np.asarray(array, dtype=object)
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    return datatype, np.require(array.astype(DATATYPES[datatype], copy=False), requirements="C")


def response_parts(response: pb.ModelInferResponse, outputs: dict[str, np.ndarray], in_shm=frozenset()) -> list:
    """response (metadata only) plus raw output contents, as buffers whose concatenation is the
    serialized response: the worker writes them to its socket or memfd without joining them.
    Outputs named in `in_shm` go to a client's shared-memory region instead: their raw entry is empty
    (kept, so that raw_output_contents[i] stays the i-th output's, as tritonclient reads them).

    Protobuf's own serializer copies large bytes fields slowly; fields may come in any order on the wire.
    """
    parts = []
    for name, array in outputs.items():
        datatype, array = _wire_array(array)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        parts += _raw_field(RAW_OUTPUT_FIELD, array.reshape(-1)[:0] if name in in_shm else array)
    return [response.SerializeToString(), *parts]


def encode_response(response: pb.ModelInferResponse, outputs: dict[str, np.ndarray]) -> bytes:
    """response_parts joined: one copy of the tensor bytes."""
    return b"".join(response_parts(response, outputs))


def response_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode a response's outputs (raw or typed) into numpy arrays."""
    raw = response.raw_output_contents
    arrays = {}
    for index, tensor in enumerate(response.outputs):
        try:
            dtype = DATATYPES[tensor.datatype]
            shape = tuple(tensor.shape)
            if raw and dtype.kind == "O":
                arrays[tensor.name] = decode_bytes(raw[index], int(np.prod(shape)), "output").reshape(shape)
            elif raw:
                arrays[tensor.name] = np.frombuffer(raw[index], dtype=dtype).reshape(shape)
            else:
                arrays[tensor.name] = _typed_array(getattr(tensor.contents, TYPED_FIELD[tensor.datatype]),
                                                   dtype, shape)
        except (KeyError, IndexError, ValueError) as exc:
            raise TensorError(f"malformed output '{tensor.name}' ({tensor.datatype} {list(tensor.shape)}) "
                              f"in the response: {exc}") from None
    return arrays


def encode_request(model: str, inputs: dict[str, np.ndarray], outputs=None, version: str = "") -> bytes:
    """A serialized ModelInferRequest with raw input contents (one copy of the tensor bytes)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    parts = []
    for name, array in inputs.items():
        datatype, array = _wire_array(array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        parts += _raw_field(RAW_INPUT_FIELD, array)
    for name in outputs or ():
        request.outputs.add(name=name)
    return b"".join([request.SerializeToString(), *parts])
