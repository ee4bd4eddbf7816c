"""A strict GGUF reader, run on the sealed bytes before MLX's GGUF loader (which crashes on crafted files).

The layout (ggml's docs/gguf.md, versions 2 and 3; everything little-endian):

    magic        4 bytes "GGUF"
    version      u32: 2 or 3 (1 had 32-bit counts and is refused; a big-endian file reads as 0x03000000)
    tensor_count u64
    kv_count     u64
    kv_count metadata entries:   key: string, value_type: u32, value
    tensor_count tensor infos:   name: string, n_dims: u32, dims: u64[n_dims] (ne0, the fastest-varying,
                                 first), ggml_type: u32, offset: u64 (relative to the data section)
    padding to `alignment`, then the data section

A string is a u64 byte length and that many UTF-8 bytes (no terminator). Value types:
0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool (one byte, 0 or 1), 8 string,
9 array (u32 element type, u64 count, the elements), 10 u64, 11 i64, 12 f64.
`general.alignment` (a u32, a power of two) sets the alignment; 32 otherwise. Each tensor's offset is a
multiple of it; ggml lays tensors out in order, each starting at the previous one's end rounded up.

The ggml type table (GGML_TYPES: type -> name, elements per block, bytes per block) is ggml's
type_traits; ids 4, 5 and 31-33 are retired. A tensor of n elements of a block type takes
n / block_elements * block_bytes bytes, and its ne0 must be a multiple of block_elements.

What MLX 0.32.4 does with each type (measured with crafted files): F32, F16, I8, I16 and I32 load as
themselves (shape = dims reversed); Q4_0, Q4_1 and Q8_0 load as MLX-quantized triples (NAME as uint32
with the last dimension times bits/32, NAME.scales and NAME.biases as float16 with the last dimension
divided by 32); BF16 and the K-quants are converted to float16 (lossily; for K-quants without checking
the block size); Q5_0, Q5_1, I64 and F64 fail; at a tensor of unknown type it stops without an error
and returns the tensors before it; a zero dimension loads as an empty tensor. MLX_TYPES and
MLX_QUANTIZED_BITS are what the engine accepts: the types MLX loads faithfully.

Bounds checked before anything is allocated: counts against what the file could hold, every string
and array length against the bytes left, names at most 64 bytes (GGML_MAX_NAME), at most 4 dimensions
(GGML_MAX_DIMS), each dimension at least 1 and at most 2^31 - 1 (MLX holds dimensions as 32-bit
integers), arrays nested at most MAX_ARRAY_DEPTH deep.
"""
from __future__ import annotations

import dataclasses
import os
import struct
from typing import BinaryIO, Mapping

from ..engine import ModelError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_NAME_BYTES = 64
MAX_DIMS = 4
MAX_DIM = 2**31 - 1
MAX_ARRAY_DEPTH = 4
MAX_STRING_BYTES = 1 << 24

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
# The types MLX loads faithfully -> the mlx.core dtype name it returns (quantized: bits per weight).
MLX_TYPES = {"F32": "float32", "F16": "float16", "I8": "int8", "I16": "int16", "I32": "int32"}
MLX_QUANTIZED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}

# value type -> (name, struct format or None)
VALUE_TYPES = {0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"), 4: ("u32", "<I"),
               5: ("i32", "<i"), 6: ("f32", "<f"), 7: ("bool", "<B"), 8: ("string", None), 9: ("array", None),
               10: ("u64", "<Q"), 11: ("i64", "<q"), 12: ("f64", "<d")}
MIN_VALUE_BYTES = {8: 8, 9: 12}   # a string: its length; an array: element type and count


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]       # GGUF order: ne0 first
    type_name: str
    offset: int                 # relative to the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major shape, as MLX and numpy see it."""
        return tuple(reversed(self.dims))


@dataclasses.dataclass(frozen=True)
class Header:
    version: int
    metadata: dict
    tensors: tuple[TensorInfo, ...]   # in offset order
    alignment: int
    data_start: int
    file_size: int


class _Refused(Exception):
    pass


class _Reader:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size, self.pos = f, size, 0

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise _Refused(f"{what} at byte {self.pos}: needs {n} bytes, the file has {self.left()} left")
        raw = self.f.read(n)
        if len(raw) != n:
            raise _Refused(f"{what} at byte {self.pos}: short read")
        self.pos += n
        return raw

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        at = self.pos
        n = self.unpack("<Q", f"{what} length")
        if n > limit:
            raise _Refused(f"{what} at byte {at}: {n} bytes long, more than {limit}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Refused(f"{what} at byte {at}: not valid UTF-8 ({exc.reason})") from None


def read_header(f: BinaryIO, name: str) -> Header:
    """Read and check the GGUF file open as f; ModelError names `name` and the defect."""
    try:
        return _read(f)
    except _Refused as exc:
        raise ModelError(f"{name}: {exc}") from None


def read_file(path: str, name: str) -> Header:
    with open(path, "rb") as f:
        return read_header(f, name)


def _value(r: _Reader, vtype: int, key: str, depth: int = 0):
    if vtype not in VALUE_TYPES:
        raise _Refused(f"metadata '{key}': value type {vtype} is not a GGUF type")
    kind, fmt = VALUE_TYPES[vtype]
    if fmt is not None:
        value = r.unpack(fmt, f"metadata '{key}'")
        if kind == "bool":
            if value not in (0, 1):
                raise _Refused(f"metadata '{key}': bool byte {value} is neither 0 nor 1")
            return bool(value)
        return value
    if kind == "string":
        return r.string(f"metadata '{key}' string")
    if depth >= MAX_ARRAY_DEPTH:
        raise _Refused(f"metadata '{key}': arrays nested more than {MAX_ARRAY_DEPTH} deep")
    etype = r.unpack("<I", f"metadata '{key}' array type")
    count = r.unpack("<Q", f"metadata '{key}' array length")
    if etype not in VALUE_TYPES:
        raise _Refused(f"metadata '{key}': array element type {etype} is not a GGUF type")
    fmt = VALUE_TYPES[etype][1]
    least = struct.calcsize(fmt) if fmt else MIN_VALUE_BYTES[etype]
    if count * least > r.left():
        raise _Refused(f"metadata '{key}': an array of {count} {VALUE_TYPES[etype][0]} values does not fit in the "
                       f"{r.left()} bytes left")
    return [_value(r, etype, key, depth + 1) for _ in range(count)]


def _read(f: BinaryIO) -> Header:
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    r = _Reader(f, size)
    if size < 24:
        raise _Refused(f"{size} bytes: too short for a GGUF header (24 bytes)")
    magic = r.take(4, "magic")
    if magic != MAGIC:
        raise _Refused(f"magic {magic!r} is not b'GGUF'")
    version = r.unpack("<I", "version")
    if version not in VERSIONS:
        raise _Refused(f"GGUF version {version} is not one this reader knows ({', '.join(map(str, VERSIONS))})")
    tensor_count = r.unpack("<Q", "tensor count")
    kv_count = r.unpack("<Q", "metadata count")
    # The smallest tensor info is 33 bytes (1-byte name, one dimension); the smallest entry 14 bytes.
    if tensor_count * 33 + kv_count * 14 > r.left():
        raise _Refused(f"{tensor_count} tensors and {kv_count} metadata entries cannot fit in a file of "
                       f"{size} bytes")

    metadata: dict = {}
    for _ in range(kv_count):
        key = r.string("metadata key", MAX_STRING_BYTES)
        if key in metadata:
            raise _Refused(f"metadata key '{key}' appears twice")
        metadata[key] = _value(r, r.unpack("<I", f"metadata '{key}' type"), key)
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        # The type must be u32: re-reading is not possible, so check the value's Python type and range.
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 \
                or alignment & (alignment - 1) or alignment > 1 << 20:
            raise _Refused(f"general.alignment {alignment!r} is not a power of two up to 2^20")

    tensors, names = [], set()
    for _ in range(tensor_count):
        at = r.pos
        tname = r.string("tensor name", MAX_NAME_BYTES)
        where = f"tensor '{tname}'"
        if not tname:
            raise _Refused(f"tensor info at byte {at}: empty name")
        if tname in names:
            raise _Refused(f"{where}: the name appears twice")
        names.add(tname)
        n_dims = r.unpack("<I", f"{where} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Refused(f"{where}: {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = struct.unpack(f"<{n_dims}Q", r.take(8 * n_dims, f"{where} dimensions"))
        for d in dims:
            if not 1 <= d <= MAX_DIM:
                raise _Refused(f"{where}: dimensions {list(dims)}: {d} is "
                               + ("zero" if d == 0 else f"larger than {MAX_DIM} (MLX holds dimensions as "
                                                         "32-bit integers)"))
        ggml_type = r.unpack("<I", f"{where} type")
        if ggml_type not in GGML_TYPES:
            raise _Refused(f"{where}: type {ggml_type} is not a ggml type")
        type_name, block, block_bytes = GGML_TYPES[ggml_type]
        if dims[0] % block:
            raise _Refused(f"{where}: {type_name} stores blocks of {block} elements, but ne0 = {dims[0]}")
        count = 1
        for d in dims:
            count *= d
        nbytes = count // block * block_bytes
        offset = r.unpack("<Q", f"{where} offset")
        if offset % alignment:
            raise _Refused(f"{where}: offset {offset} is not a multiple of the alignment {alignment}")
        tensors.append(TensorInfo(tname, tuple(dims), type_name, offset, nbytes))

    data_start = r.pos + (-r.pos % alignment)
    if data_start > size:
        raise _Refused(f"the data section would start at byte {data_start}, past the end of the file ({size})")
    data_size = size - data_start
    tensors.sort(key=lambda t: t.offset)
    position, previous = 0, None
    for t in tensors:
        expected = position + (-position % alignment)
        if t.offset < position:
            raise _Refused(f"tensor '{previous.name}' bytes [{previous.offset}, {position}) overlap "
                           f"'{t.name}' [{t.offset}, {t.offset + t.nbytes})")
        if t.offset != expected:
            raise _Refused(f"data bytes [{position}, {t.offset}) belong to no tensor (a gap before '{t.name}')")
        if t.offset + t.nbytes > data_size:
            raise _Refused(f"tensor '{t.name}' bytes [{t.offset}, {t.offset + t.nbytes}) run past the end of the "
                           f"data ({data_size} bytes)")
        position, previous = t.offset + t.nbytes, t
    if data_size > position + (-position % alignment):   # padding to the alignment may follow, no more
        raise _Refused(f"{data_size - position} bytes trail after the last tensor's data "
                       f"(the tensors end at data byte {position} of {data_size})")
    return Header(version, metadata, tuple(tensors), alignment, data_start, size)


def check_for_mlx(header: Header, name: str) -> None:
    """Refuse the types MLX would convert, drop or fail on."""
    for t in header.tensors:
        if t.type_name not in MLX_TYPES and t.type_name not in MLX_QUANTIZED_BITS:
            raise ModelError(f"{name}: tensor '{t.name}': type {t.type_name} is not loaded by MLX as itself "
                             f"(MLX loads: {', '.join([*MLX_TYPES, *MLX_QUANTIZED_BITS])})")


def expected_arrays(header: Header) -> dict[str, tuple[str, tuple[int, ...]]]:
    """What mx.load must return for header: name -> (mlx dtype name, shape)."""
    out = {}
    for t in header.tensors:
        shape = t.shape
        if t.type_name in MLX_QUANTIZED_BITS:
            bits = MLX_QUANTIZED_BITS[t.type_name]
            out[t.name] = ("uint32", shape[:-1] + (shape[-1] * bits // 32,))
            for part in ("scales", "biases"):
                out[f"{t.name}.{part}"] = ("float16", shape[:-1] + (shape[-1] // 32,))
        else:
            out[t.name] = (MLX_TYPES[t.type_name], shape)
    return out


def check_loaded(header: Header, loaded: Mapping, name: str) -> None:
    expected = expected_arrays(header)
    if set(loaded) != set(expected):
        missing, extra = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
        raise ModelError(f"{name}: MLX returned other tensors than the file declares "
                         f"(missing {missing}, unexpected {extra})")
    for tensor, array in loaded.items():
        dtype = str(array.dtype).removeprefix("mlx.core.")
        if (dtype, tuple(array.shape)) != expected[tensor]:
            want_dtype, want_shape = expected[tensor]
            raise ModelError(f"{name}: tensor '{tensor}': MLX loaded {dtype} {list(array.shape)}, "
                             f"the file declares {want_dtype} {list(want_shape)}")
