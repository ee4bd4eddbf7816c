"""A strict safetensors reader, run on the sealed bytes before mx.load.

The layout (huggingface/safetensors, format version 1):

    offset 0        u64 little-endian N: the header's length in bytes
    offset 8        N bytes: a UTF-8 JSON object (the header); it must start with `{`
                    and may be padded at the end with spaces (0x20) and nothing else
    offset 8 + N    the data section: every tensor's bytes, row-major, little-endian

The header maps each tensor name to {"dtype": str, "shape": [int, ...],
"data_offsets": [begin, end]}, offsets relative to the start of the data
section, `end` exclusive. One optional key, "__metadata__", maps strings to
strings, or is null (what mx.save_safetensors writes without metadata). The
reference implementation caps N at 100 MB; here it is MAX_HEADER_BYTES, so a
reader never allocates more than that for a header.

What this reader refuses (all of which MLX 0.32 accepts and then loads
wrongly or crashes on, measured with the installed MLX):
- a header length past the file or past MAX_HEADER_BYTES; a header that is not
  UTF-8, not one JSON object, padded with anything but spaces (NULs, say), or
  holding duplicate keys, NaN/Infinity, or floats or booleans where the format
  says integer;
- a dtype outside DTYPE_BITS, a shape that is not a list of non-negative
  integers, an element count whose size in bytes differs from its byte range;
- byte ranges outside the data section, overlapping, leaving gaps, or not
  reaching its end (bytes trailing after the data); tensors are taken in
  offset order and must tile the data section exactly;
- __metadata__ values that are not strings.

`check_for_mlx` adds what MLX itself can represent: MLX holds dimensions as
32-bit signed integers (a dimension past 2^31 - 1 is silently truncated: a
declared [2^32 + 2, 2] loads as [2, 2]), loads F8_E4M3 and F8_E8M0 as raw
uint8, and refuses F64, F8_E5M2, F4 and F6. `check_loaded` compares what
mx.load returned with the header: same names, dtypes and shapes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import BinaryIO, Mapping

from ..engine import ModelError

MAX_HEADER_BYTES = 100_000_000   # the reference implementation's limit
MAX_DIMS = 64
METADATA_KEY = "__metadata__"
TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})

# Every dtype of the format (safetensors 0.5), in bits per element.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# The dtypes MLX loads as themselves, with the name of the mlx.core dtype it returns.
MLX_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
    "C64": "complex64",
}
MLX_MAX_DIM = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int        # relative to the data section, as in the header
    end: int          # exclusive


@dataclasses.dataclass(frozen=True)
class Header:
    tensors: tuple[TensorInfo, ...]      # in offset order
    metadata: dict[str, str]
    data_start: int                       # 8 + N
    file_size: int


class _Refused(Exception):
    """A defect, without the file name: read_header adds it."""


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"header has the key {key!r} twice")
        obj[key] = value
    return obj


def _no_constants(name):
    raise _Refused(f"header holds {name}, which is not JSON")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_header(f: BinaryIO, name: str) -> Header:
    """Read and check the header of the safetensors file open as f; ModelError names `name` and the defect."""
    try:
        return _read(f)
    except _Refused as exc:
        raise ModelError(f"{name}: {exc}") from None


def read_file(path: str, name: str) -> Header:
    with open(path, "rb") as f:
        return read_header(f, name)


def _read(f: BinaryIO) -> Header:
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise _Refused(f"{size} bytes: too short for a header length (8 bytes)")
    f.seek(0)
    (length,) = struct.unpack("<Q", f.read(8))
    if length > MAX_HEADER_BYTES:
        raise _Refused(f"header length {length} is larger than {MAX_HEADER_BYTES} bytes")
    if length > size - 8:
        raise _Refused(f"header length {length} runs past the end of the file ({size} bytes)")
    if length < 2:
        raise _Refused(f"header length {length} cannot hold a JSON object")
    raw = f.read(length)
    if len(raw) != length:
        raise _Refused(f"header: read {len(raw)} of {length} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(f"header is not valid UTF-8 (byte {exc.start} of the header: {exc.reason})") from None
    if not text.startswith("{"):
        raise _Refused("header does not start with '{'")
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    try:
        obj, end = decoder.raw_decode(text)
    except json.JSONDecodeError as exc:
        raise _Refused(f"header is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except (RecursionError, ValueError) as exc:   # too deep; an integer of more than 4300 digits
        raise _Refused(f"header is not valid JSON ({exc})") from None
    rest = text[end:]
    if rest.strip(" "):
        if not rest.strip("\x00 "):
            raise _Refused(f"header is padded with NUL bytes ({len(rest)} bytes after the JSON object; "
                           "only spaces may pad it)")
        raise _Refused(f"header goes on after its JSON object with {rest.strip(' ')[:16]!r} "
                       "(only spaces may pad it)")
    if not isinstance(obj, dict):
        raise _Refused("header is not a JSON object")
    data_start, data_size = 8 + length, size - 8 - length

    metadata = obj.pop(METADATA_KEY, None)
    if metadata is None:  # absent, or null as the reference implementation writes it (Option<HashMap>)
        metadata = {}
    if not isinstance(metadata, dict):
        raise _Refused(f"{METADATA_KEY} must be an object of strings, not {_show(metadata)}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _Refused(f"{METADATA_KEY}: {key!r} must be a string, not {_show(value)}")

    tensors = [_tensor(tensor, entry, data_size) for tensor, entry in obj.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    position, previous = 0, None
    for t in tensors:
        if t.begin < position:
            raise _Refused(f"tensor '{previous.name}' bytes [{previous.begin}, {previous.end}) overlap "
                           f"'{t.name}' [{t.begin}, {t.end})")
        if t.begin > position:
            raise _Refused(f"data bytes [{position}, {t.begin}) belong to no tensor (a gap before '{t.name}')")
        position, previous = t.end, t
    if position != data_size:
        raise _Refused(f"{data_size - position} bytes trail after the last tensor's data "
                       f"(the tensors end at data byte {position} of {data_size})")
    return Header(tuple(tensors), metadata, data_start, size)


def _tensor(name: str, entry, data_size: int) -> TensorInfo:
    where = f"tensor '{name}'"
    if not isinstance(entry, dict):
        raise _Refused(f"{where}: must be an object with dtype, shape and data_offsets, not {_show(entry)}")
    if set(entry) != TENSOR_KEYS:
        missing, extra = sorted(TENSOR_KEYS - set(entry)), sorted(set(entry) - TENSOR_KEYS)
        raise _Refused(f"{where}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown keys {extra}"] if extra else [])))
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _Refused(f"{where}: dtype {_show(dtype)} is not a safetensors dtype")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise _Refused(f"{where}: shape must be a list of at most {MAX_DIMS} integers, not {_show(shape)}")
    for d in shape:
        if not _is_int(d) or d < 0:
            raise _Refused(f"{where}: shape {_show(shape)}: dimension {_show(d)} is not a non-negative integer")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _Refused(f"{where}: data_offsets must be two integers, not {_show(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _Refused(f"{where}: data_offsets [{begin}, {end}) is not a byte range")
    if end > data_size:
        raise _Refused(f"{where}: bytes [{begin}, {end}) run past the end of the data ({data_size} bytes)")
    bits = DTYPE_BITS[dtype]
    count, limit = (0 if 0 in shape else 1), (end - begin) * 8 // bits + 1
    for d in shape if count else ():
        count *= d
        if count > limit:   # stop multiplying once past what the range could hold
            break
    if count * bits != (end - begin) * 8:
        raise _Refused(f"{where}: shape {list(shape)} of {dtype} needs "
                       + (f"more than {end - begin}" if count > limit else f"{count * bits / 8:g}")
                       + f" bytes, but its data_offsets [{begin}, {end}) hold {end - begin}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def check_for_mlx(header: Header, name: str) -> None:
    """Refuse what MLX would load as something else: dtypes it lacks, dimensions past 32 bits."""
    for t in header.tensors:
        if t.dtype not in MLX_DTYPES:
            raise ModelError(f"{name}: tensor '{t.name}': dtype {t.dtype} is not loadable by MLX as itself "
                             f"(MLX loads: {', '.join(MLX_DTYPES)})")
        for d in t.shape:
            if d > MLX_MAX_DIM:
                raise ModelError(f"{name}: tensor '{t.name}': shape {list(t.shape)}: dimension {d} is larger "
                                 f"than {MLX_MAX_DIM} (MLX holds dimensions as 32-bit integers)")


def check_loaded(header: Header, loaded: Mapping, name: str) -> None:
    """What mx.load returned must be exactly what the header declared: names, dtypes, shapes."""
    declared = {t.name: t for t in header.tensors}
    if set(loaded) != set(declared):
        missing, extra = sorted(set(declared) - set(loaded)), sorted(set(loaded) - set(declared))
        raise ModelError(f"{name}: MLX returned other tensors than the header declares "
                         f"(missing {missing}, unexpected {extra})")
    for tensor, array in loaded.items():
        t = declared[tensor]
        dtype = str(array.dtype).removeprefix("mlx.core.")
        if dtype != MLX_DTYPES.get(t.dtype) or tuple(array.shape) != t.shape:
            raise ModelError(f"{name}: tensor '{tensor}': MLX loaded {dtype} {list(array.shape)}, "
                             f"the header declares {t.dtype} {list(t.shape)}")
