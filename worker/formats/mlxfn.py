"""What is checked of an .mlxfn file (mx.export_function) before mx.import_function parses it.

The format is MLX-internal and unversioned in MLX's docs. What was established by experiment with the
installed MLX 0.32.4 (files written by mx.export_function, read back byte by byte):

    offset 0     u64 little-endian L: the length of the version string
    offset 8     L bytes: the MLX version that wrote the file, ASCII ("0.32.4")
    then         the traced graph(s): flags (the shapeless flag is the byte at 8 + L + 4), inputs,
                 constants, primitives and their arguments

mx.import_function does not check that version (a file from another MLX version is parsed as if it were
its own), and a corrupted graph crashes it: heap corruption (SIGABRT) or SIGSEGV at import, or on the
first call; other corruptions raise IndexError or MemoryError (std::bad_alloc on a length field).

The layout past the version field, from MLX's writer (mlx/export.cpp: write_header and
FunctionExporter::export_function; its reader is ImportedFunction::ImportedFunction), confirmed byte by
byte on files MLX 0.32.4 writes. Integers are little-endian; a string is u64 length + bytes; a vector is
u64 count + items; a shape is a vector of i32; a dtype is i32 Dtype::Val + u8 size:

    header       string version, i32 function count, u8 shapeless, string metadata
    per function vector<string> keyword names (sorted), vector<u64> input ids,
                 vector<(shape, dtype)> inputs (positional first, then one per keyword name),
                 vector<u64> output ids, u64 tape size (the node count), then the tape: per node
                 u64 id, u8 has-primitive, and either the node's input ids, stream, primitive name,
                 the primitive's own state, and output shapes/dtypes; or a constant (shape, dtype,
                 raw bytes) or a reference to an input.

Checked here, before mx.import_function sees a byte (check_file, then check_graph):
  * the file's size (MAX_BYTES, before anything else is read);
  * the version field's length and characters, that the version is one this reader was written for
    (KNOWN_VERSIONS, pinned with `mlx` in pyproject.toml) and is the running MLX's version;
  * exactly one function in the file (what mx.export_function writes; sealbox calls only one);
  * the metadata string's length (bounded by the file);
  * arity against model.json: as many positional inputs as model.json lists, each with the declared
    rank and datatype; the keyword names exactly the weights file's tensor names, each with that
    tensor's rank and dtype; as many outputs as model.json lists;
  * the node count (tape size) at most MAX_NODES, and no more than the rest of the file can hold
    (MIN_NODE_BYTES per node): a 200 000-node graph is refused in microseconds instead of taking
    MLX tens of seconds to import and call.
NOT checked: the tape itself. Each node carries its primitive's state, whose encoding depends on the
primitive (about 150 of them, each its own C++ state tuple), so the tape cannot be walked without a
table of every primitive's state layout; graph depth and the primitives used are therefore not
checked. Depth is bounded only through the node count (depth <= nodes <= MAX_NODES). The engine then
refuses a function that does not accept the declared inputs (warm-up calls at two batch sizes when a
dimension is -1).
"""
from __future__ import annotations

import os
import struct

from ..engine import ModelError

KNOWN_VERSIONS = ("0.32.4",)      # the MLX versions whose .mlxfn layout the notes above describe
MAX_BYTES = 256 * 2**20           # graphs with weights passed as inputs are kilobytes; constants make them grow
MAX_VERSION_BYTES = 32
SHAPELESS_FLAG_OFFSET = 4         # after the version string
MAX_NODES = 100_000               # an MLP export has tens of nodes, a transformer block a few hundred;
                                  # MLX 0.32.4 imports ~20 000 nodes a second on a 2-core machine
MIN_NODE_BYTES = 10               # u64 id + u8 has-primitive + u8 is-constant: the smallest tape node
MAX_METADATA_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20       # header, metadata, names and input list: read no further than this
MAX_TENSORS = 4096                # inputs, keyword names, outputs
MAX_NAME_BYTES = 1024             # a keyword (weight) name
MAX_RANK = 16
# Dtype::Val (mlx/dtype.h) -> (size in bytes, Open Inference Protocol datatype, numpy dtype name)
DTYPES = {0: (1, "BOOL", "bool"), 1: (1, "UINT8", "uint8"), 2: (2, "UINT16", "uint16"),
          3: (4, "UINT32", "uint32"), 4: (8, "UINT64", "uint64"), 5: (1, "INT8", "int8"),
          6: (2, "INT16", "int16"), 7: (4, "INT32", "int32"), 8: (8, "INT64", "int64"),
          9: (2, "FP16", "float16"), 10: (4, "FP32", "float32"), 11: (8, "FP64", "float64"),
          12: (2, "BF16", "bfloat16"), 13: (8, "COMPLEX64", "complex64")}


def check_file(path: str, name: str, running_mlx: str) -> dict:
    """Check the file at path; return {"version": ..., "shapeless": bool}. ModelError names the defect."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_BYTES:
            raise ModelError(f"{name}: {size} bytes, more than the {MAX_BYTES} an exported function may have")
        head = f.read(8 + MAX_VERSION_BYTES + SHAPELESS_FLAG_OFFSET + 1)
    if len(head) < 8:
        raise ModelError(f"{name}: {size} bytes: too short for an MLX exported function")
    (length,) = struct.unpack("<Q", head[:8])
    if not 1 <= length <= MAX_VERSION_BYTES or len(head) < 8 + length + SHAPELESS_FLAG_OFFSET + 1:
        raise ModelError(f"{name}: version field length {length} is not that of an MLX version "
                         f"(1 to {MAX_VERSION_BYTES} bytes, then the graph)")
    raw = head[8:8 + length]
    if not all(0x30 <= b <= 0x39 or b in b".-+abcdefghijklmnopqrstuvwxyz" for b in raw):
        raise ModelError(f"{name}: version field {raw!r} is not an MLX version")
    version = raw.decode("ascii")
    if version not in KNOWN_VERSIONS:
        raise ModelError(f"{name}: written by MLX {version}; this reader knows the layout of MLX "
                         f"{', '.join(KNOWN_VERSIONS)} only")
    if version != running_mlx:
        raise ModelError(f"{name}: written by MLX {version}, but the worker runs MLX {running_mlx}")
    flag = head[8 + length + SHAPELESS_FLAG_OFFSET]
    if flag not in (0, 1):
        raise ModelError(f"{name}: shapeless flag byte {flag} is neither 0 nor 1")
    return {"version": version, "shapeless": bool(flag)}


class _Reader:
    """Bounded little-endian reads from the file's bytes; every length is checked against what is left."""

    def __init__(self, data: bytes, name: str, offset: int, size: int):
        self.data, self.name, self.pos, self.size = data, name, offset, size

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise ModelError(f"{self.name}: {what} at byte {self.pos} runs past the end of the file")
        if self.pos + n > len(self.data):
            raise ModelError(f"{self.name}: {what} at byte {self.pos} lies beyond the first "
                             f"{MAX_HEADER_BYTES} bytes, where the function's header must end")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def count(self, what: str, limit: int, item_bytes: int) -> int:
        n = self.u64(f"the {what} count")
        if n > limit or n * item_bytes > self.left():
            raise ModelError(f"{self.name}: {n} {what}; at most {limit}, and no more than the file holds")
        return n

    def string(self, what: str, limit: int) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise ModelError(f"{self.name}: {what} of {n} bytes, more than {limit}")
        return self.take(n, what)

    def tensor(self, what: str) -> tuple[tuple[int, ...], str]:
        rank = self.count(f"dimensions of {what}", MAX_RANK, 4)
        shape = tuple(self.i32(f"a dimension of {what}") for _ in range(rank))
        val, size = self.i32(f"the dtype of {what}"), self.u8(f"the dtype size of {what}")
        if val not in DTYPES or DTYPES[val][0] != size:
            raise ModelError(f"{self.name}: {what} has dtype ({val}, {size} bytes), not an MLX dtype")
        return shape, DTYPES[val][1]


def check_graph(path: str, name: str, inputs, outputs, keywords: dict[str, tuple[int, str]]) -> dict:
    """Check the function table's header against model.json, before MLX imports the file.

    inputs/outputs: model.json's TensorSpecs (name, datatype, shape). keywords: the weights passed as
    keyword inputs, name -> (rank, Open Inference Protocol datatype). Returns {"nodes": tape size}.
    Call after check_file (which has checked the size and the version)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(MAX_HEADER_BYTES)
    (length,) = struct.unpack("<Q", data[:8])
    r = _Reader(data, name, 8 + length, min(size, MAX_BYTES))
    functions = r.i32("the function count")
    if functions != 1:
        raise ModelError(f"{name}: holds {functions} functions; sealbox serves files with exactly one "
                         "(what mx.export_function writes)")
    r.u8("the shapeless flag")                     # its value was checked by check_file
    r.string("the metadata", MAX_METADATA_BYTES)
    keys = [r.string("a keyword name", MAX_NAME_BYTES) for _ in range(r.count("keyword names", MAX_TENSORS, 8))]
    try:
        key_names = [k.decode("utf-8") for k in keys]
    except UnicodeDecodeError:
        raise ModelError(f"{name}: a keyword name is not UTF-8") from None
    n_ids = r.count("input ids", MAX_TENSORS, 8)
    r.take(8 * n_ids, "the input ids")
    n_inputs = r.count("inputs", MAX_TENSORS, 13)
    if n_inputs != n_ids:
        raise ModelError(f"{name}: {n_ids} input ids for {n_inputs} inputs")
    traced = [r.tensor(f"input {i + 1}") for i in range(n_inputs)]
    n_outputs = r.count("output ids", MAX_TENSORS, 8)
    r.take(8 * n_outputs, "the output ids")
    nodes = r.u64("the node count")
    if nodes > MAX_NODES:
        raise ModelError(f"{name}: a graph of {nodes} nodes, more than the {MAX_NODES} an exported "
                         "function may have")
    if nodes * MIN_NODE_BYTES > r.left():
        raise ModelError(f"{name}: claims {nodes} nodes, but only {r.left()} bytes follow "
                         f"(at least {MIN_NODE_BYTES} per node)")
    # Arity and types against model.json and the weights.
    positional = n_inputs - len(key_names)
    if positional != len(inputs):
        raise ModelError(f"{name}: the function takes {positional} positional inputs, but model.json lists "
                         f"{len(inputs)} ({', '.join(t.name for t in inputs)})")
    if key_names != sorted(keywords):
        raise ModelError(f"{name}: the function's keyword inputs {key_names} are not the weights' tensors "
                         f"{sorted(keywords)}")
    for spec, (shape, datatype) in zip(inputs, traced):
        if len(shape) != len(spec.shape) or datatype != spec.datatype:
            raise ModelError(f"{name}: input '{spec.name}' is {datatype} of rank {len(shape)} in the function, "
                             f"but model.json declares {spec.datatype} {list(spec.shape)}")
    for key, (shape, datatype) in zip(key_names, traced[positional:]):
        rank, dtype = keywords[key]
        if len(shape) != rank or datatype != dtype:
            raise ModelError(f"{name}: keyword input '{key}' is {datatype} of rank {len(shape)} in the function, "
                             f"but the weight is {dtype} of rank {rank}")
    if n_outputs != len(outputs):
        raise ModelError(f"{name}: the function returns {n_outputs} outputs, but model.json lists "
                         f"{len(outputs)} ({', '.join(t.name for t in outputs)})")
    return {"nodes": nodes}
