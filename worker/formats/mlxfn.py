"""What is checked of an .mlxfn file (mx.export_function) before mx.import_function parses it.

The format is MLX-internal and unversioned in MLX's docs. mx.import_function does not check the version
field (a file from another MLX version is parsed as if it were its own), and a corrupted graph crashes it:
heap corruption (SIGABRT) or SIGSEGV at import or on the first call; other corruptions raise IndexError or
MemoryError (std::bad_alloc on a length field).

The layout, from MLX's writer (mlx/export.cpp: write_header, FunctionExporter::export_function,
PrimitiveFactory::save and the serialize() overloads; its reader is ImportedFunction::ImportedFunction),
confirmed byte by byte on files MLX 0.32.4 writes: every export in tests/unit/test_formats_mlxfn.py is
walked to its last byte. Integers are little-endian; a bool is one byte; an enum is an i32; a string is
u64 length + bytes; a vector is u64 count + items; a shape is a vector of i32; a dtype is i32 Dtype::Val
+ u8 size; a stream is i32 index, i32 device type (0 cpu, 1 gpu), i32 device index:

    header       string version (the MLX that wrote the file, "0.32.4"), i32 function count,
                 u8 shapeless, string metadata
    per function vector<string> keyword names (sorted), vector<u64> input ids,
                 vector<(shape, dtype)> inputs (positional first, then one per keyword name),
                 vector<u64> output ids, u64 tape size (the node count), then the tape
    per node     u64 id, bool has-primitive, then either
                   vector<u64> input ids, stream, string primitive name, the primitive's state (its
                   state() tuple, element by element; nothing for a primitive without state), u64 sibling
                   count s, and for s = 0 the output's shape and dtype, else vector<u64> the s + 1 output
                   ids, vector<shape> and vector<dtype> of the s + 1 outputs;
                 or bool is-constant, and for a constant its shape, dtype and shape x dtype-size raw
                   bytes (MLX writes them once per id: a second node of that id is refused here); for
                   an input, nothing (a reference to the function input of that id).
    nothing follows the tape (one function per file).

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
    MLX tens of seconds to import and call;
  * the whole tape, node by node in one pass (no recursion; the file is read through a bounded window
    and constants' bytes are skipped, not read): every primitive is in PRIMITIVES (unknown ones are
    refused by name: fail closed) and its state has exactly the layout listed there (bools 0 or 1,
    enums in range, vectors bounded); the primitives with a fixed number of inputs (ARITY: elementwise,
    select, matmul) have that many; every input id of a node is defined by an earlier node, an input
    or a constant (no forward, dangling or self reference); no id is defined twice; an input reference
    names a function input; streams are cpu or gpu; every shape has rank at most MAX_RANK and no
    negative dimension, every dtype is an MLX dtype; a constant's bytes (shape x dtype size) lie inside
    the file; the output ids are defined; the tape ends exactly at the end of the file;
  * the graph's depth (primitives on the longest path from an input or constant to a node) at most
    MAX_DEPTH.
MAX_DEPTH was chosen from measurement, not from a crash: MLX 0.32.4's import and evaluation are not
recursive (a 1 000 000-node Add chain imported in 11 s and ran in a thread with a 128 KiB stack), so depth
costs time, not stack. Each level is a sequential step (about 9 us to import and 5 us to call per node on
the 2-core development machine): 10 000 levels import in 0.09 s and run in 0.05 s per call, while a
small transformer block exported by MLX is 63 deep (124 nodes) and the demo MLP 12.
NOT checked: that a primitive's arguments agree with its inputs' and outputs' shapes (the reader does no
shape inference). MLX builds each primitive from the file's state without the checks of its ops, so a
signed but crafted graph that passes the walk can still make MLX fail or crash at the first call (the
daemon tests find such two-byte mutants): that costs only the model's sandboxed worker. The engine
refuses a function that does not accept the declared inputs (warm-up calls at two batch sizes when a
dimension is -1).
"""
from __future__ import annotations

import math
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
WINDOW_BYTES = 1 << 20            # the reader's window onto the file
MAX_TENSORS = 4096                # inputs, keyword names, outputs
MAX_NAME_BYTES = 1024             # a keyword (weight) name
MAX_RANK = 16
# Dtype::Val (mlx/dtype.h) -> (size in bytes, Open Inference Protocol datatype, numpy dtype name)
DTYPES = {0: (1, "BOOL", "bool"), 1: (1, "UINT8", "uint8"), 2: (2, "UINT16", "uint16"),
          3: (4, "UINT32", "uint32"), 4: (8, "UINT64", "uint64"), 5: (1, "INT8", "int8"),
          6: (2, "INT16", "int16"), 7: (4, "INT32", "int32"), 8: (8, "INT64", "int64"),
          9: (2, "FP16", "float16"), 10: (4, "FP32", "float32"), 11: (8, "FP64", "float64"),
          12: (2, "BF16", "bfloat16"), 13: (8, "COMPLEX64", "complex64")}

MAX_DEPTH = 10_000                # primitives on the longest path from an input or constant to an output
MAX_NODE_INPUTS = 4096
MAX_NODE_OUTPUTS = 4096           # a multi-output primitive (split, divmod)
MAX_DEVICES = 64                  # a stream's device index
MAX_PRIMITIVE_NAME_BYTES = 64
MAX_STATE_ITEMS = 4096            # items of one vector in a primitive's state (axes, shapes, strides)

# The primitives this reader knows, each with its state as MLX 0.32.4 serializes it (mlx/export.cpp:
# PrimitiveFactory lists the names, each class's state() in mlx/primitives.h and mlx/fast_primitives.h
# the tuple, serialize() the encoding). Kinds: "i32" int, "f32" float, "f64" double, "u64" size_t,
# "bool" one byte 0/1, "dtype" i32 + u8 size, "ints" a vector of i32 (also Shape), ("enum", n) an int in
# [0, n). A fast primitive's state starts with a nullptr, which writes nothing. Left out on purpose:
# AsStrided (arbitrary strides reach any memory), CustomKernel (source code), and everything no sealbox
# model uses and no test exports (linear algebra, FFT, quantization, random bits, scatter, ...).
_UNARY = (
    "Abs", "ArcCos", "ArcCosh", "ArcSin", "ArcSinh", "ArcTan", "ArcTanh", "Ceil", "Copy", "Cos", "Cosh",
    "Erf", "ErfInv", "Exp", "Expm1", "Floor", "Imag", "Log1p", "LogicalNot", "Negative", "Real", "Round",
    "Sigmoid", "Sign", "Sin", "Sinh", "Square", "StopGradient", "Tan", "Tanh")
_BINARY = (
    "Add", "ArcTan2", "Divide", "Greater", "GreaterEqual", "Less", "LessEqual", "LogAddExp", "LogicalAnd",
    "LogicalOr", "Maximum", "Minimum", "Multiply", "NotEqual", "Power", "Remainder", "Subtract")
_REDUCE = ("enum", 6)             # Reduce::ReduceType: And, Or, Sum, Prod, Min, Max
PRIMITIVES: dict[str, tuple] = {
    **{unary: () for unary in _UNARY},
    **{binary: () for binary in _BINARY},
    "Select": (),                               # where(condition, x, y)
    "Matmul": (),
    "Full": (),
    "LogSumExp": (),
    "AddMM": ("f32", "f32"),                    # alpha, beta
    "Arange": ("f64", "f64", "f64"),            # start, stop, step
    "ArgReduce": (("enum", 2), "i32"),          # ArgMin/ArgMax, axis
    "ArgSort": ("i32",),                        # axis
    "ArgPartition": ("i32", "i32"),             # kth, axis
    "AsType": ("dtype",),
    "BitwiseBinary": (("enum", 5),),            # and, or, xor, left shift, right shift (also on bools)
    "Broadcast": ("ints",),                     # shape
    "BroadcastAxes": ("ints",),                 # ignored axes
    "Concatenate": ("i32",),                    # axis
    "Convolution": ("ints", "ints", "ints", "ints", "ints", "i32", "bool"),  # strides, padding low and high,
                                                # kernel and input dilation, groups, flip
    "Equal": ("bool",),                         # equal_nan
    "ExpandDims": ("ints",),                    # axes
    "Flatten": ("i32", "i32"),                  # start axis, end axis
    "Gather": ("ints", "ints"),                 # axes, slice sizes
    "GatherAxis": ("i32",),                     # axis (take_along_axis)
    "Log": (("enum", 3),),                      # base: two, ten, e
    "NumberOfElements": ("ints", "bool", "dtype"),  # axes, inverted, dtype (mean, var of a shapeless input)
    "Pad": ("ints", "ints", "ints"),            # axes, low, high
    "Reduce": (_REDUCE, "ints"),                # reduce type, axes
    "Reshape": ("ints",),                       # shape
    "Scan": (("enum", 5), "i32", "bool", "bool"),   # cumsum/cumprod/...: type, axis, reverse, inclusive
    "Slice": ("ints", "ints", "ints"),          # start, stop, strides
    "Softmax": ("bool",),                       # precise
    "Sort": ("i32",),                           # axis
    "Split": ("ints", "i32"),                   # indices, axis
    "Sqrt": ("bool",),                          # reciprocal (rsqrt)
    "Squeeze": ("ints",),                       # axes
    "Transpose": ("ints",),                     # axes
    "Unflatten": ("i32", "ints"),               # axis, shape
    "LayerNorm": ("f32",),                      # mx.fast.layer_norm: eps
    "RMSNorm": ("f32",),                        # mx.fast.rms_norm: eps
    "RoPE": ("i32", "bool", "f32", "f32", "bool"),  # dims, traditional, base, scale, forward
    "ScaledDotProductAttention": ("f32", "bool", "bool", "bool", "bool"),  # scale, causal, sinks, lse, fused
}
# How many inputs the primitives with a fixed count take: MLX's kernels index their inputs without checking.
ARITY = {**{unary: 1 for unary in _UNARY}, **{binary: 2 for binary in _BINARY},
         "Equal": 2, "Select": 3, "Matmul": 2, "AddMM": 3}


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
    """Bounded little-endian reads from the open file; every length is checked against what is left.

    Reads go through a window of at most WINDOW_BYTES (or one item's length) read at the current position:
    the walk reads the graph and seeks over constants' bytes, so memory does not grow with the file. (Not
    mmap: Python's mmap dup()s the descriptor, which the worker's seccomp filter does not allow.)"""

    def __init__(self, f, name: str, offset: int, size: int):
        self.f, self.name, self.pos, self.size = f, name, offset, size
        self.window, self.base = b"", 0

    def left(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise ModelError(f"{self.name}: {what} at byte {self.pos} runs past the end of the file")
        self.pos += n

    def _at(self, n: int, what: str) -> int:
        """Where the next n bytes start in the window (refilled if they are not all in it)."""
        start = self.pos - self.base
        if 0 <= start and start + n <= len(self.window):
            return start
        self.skip(n, what)
        self.pos -= n
        self.f.seek(self.pos)
        self.window, self.base = self.f.read(max(n, WINDOW_BYTES)), self.pos
        if len(self.window) < n:
            raise ModelError(f"{self.name}: the file ended at byte {self.pos + len(self.window)} while reading "
                             f"{what}; it is shorter than its size said")
        return 0

    def take(self, n: int, what: str) -> bytes:
        start = self._at(n, what)
        self.pos += n
        return self.window[start:start + n]

    def fields(self, fmt: struct.Struct, what: str) -> tuple:
        start = self._at(fmt.size, what)       # first: it may refill the window
        values = fmt.unpack_from(self.window, start)
        self.pos += fmt.size
        return values

    def _unpack(self, fmt: struct.Struct, what: str):
        return self.fields(fmt, what)[0]

    def u64(self, what: str) -> int:
        return self._unpack(_U64, what)

    def i32(self, what: str) -> int:
        return self._unpack(_I32, what)

    def u8(self, what: str) -> int:
        return self._unpack(_U8, what)

    def boolean(self, what: str) -> bool:
        value = self.u8(what)
        if value > 1:
            raise ModelError(f"{self.name}: {what} at byte {self.pos - 1} is {value}, not a bool (0 or 1)")
        return bool(value)

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

    def dtype(self, what: str) -> tuple[int, str]:
        """(size in bytes, Open Inference Protocol datatype)"""
        val, size = self.fields(_DTYPE, f"the dtype of {what}")
        if val not in DTYPES or DTYPES[val][0] != size:
            raise ModelError(f"{self.name}: {what} has dtype ({val}, {size} bytes), not an MLX dtype")
        return size, DTYPES[val][1]

    def shape(self, what: str) -> tuple[int, ...]:
        rank = self.count(f"dimensions of {what}", MAX_RANK, 4)
        shape = struct.unpack_from(f"<{rank}i", self.take(4 * rank, f"the dimensions of {what}"))
        if any(d < 0 for d in shape):
            raise ModelError(f"{self.name}: {what} has shape {list(shape)}: a negative dimension")
        return shape

    def tensor(self, what: str) -> tuple[tuple[int, ...], str]:
        shape = self.shape(what)
        return shape, self.dtype(what)[1]


_U64, _I32, _U8 = struct.Struct("<Q"), struct.Struct("<i"), struct.Struct("<B")
_DTYPE = struct.Struct("<iB")                   # Dtype::Val, size
_NODE = struct.Struct("<QB")                    # id, has-primitive
_STREAM_NAME = struct.Struct("<iiiQ")           # stream (index, device type, device index), name length


def check_graph(path: str, name: str, inputs, outputs, keywords: dict[str, tuple[int, str]]) -> dict:
    """Check the whole function table against model.json and walk its tape, before MLX imports the file.

    inputs/outputs: model.json's TensorSpecs (name, datatype, shape). keywords: the weights passed as
    keyword inputs, name -> (rank, Open Inference Protocol datatype). Returns {"nodes": tape size,
    "depth": the graph's depth}. Call after check_file (which has checked the size and the version)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_BYTES:   # check_file refused it already; the walk must stay bounded all the same
            raise ModelError(f"{name}: {size} bytes, more than the {MAX_BYTES} an exported function may have")
        r = _Reader(f, name, 0, size)
        r.skip(r.u64("the version field's length"), "the version field")   # checked by check_file
        return _check_graph(r, name, inputs, outputs, keywords)


def _check_graph(r: _Reader, name: str, inputs, outputs, keywords) -> dict:
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
    input_ids = struct.unpack_from(f"<{n_ids}Q", r.take(8 * n_ids, "the input ids"))
    n_inputs = r.count("inputs", MAX_TENSORS, 13)
    if n_inputs != n_ids:
        raise ModelError(f"{name}: {n_ids} input ids for {n_inputs} inputs")
    traced = [r.tensor(f"input {i + 1}") for i in range(n_inputs)]
    n_outputs = r.count("output ids", MAX_TENSORS, 8)
    output_ids = struct.unpack_from(f"<{n_outputs}Q", r.take(8 * n_outputs, "the output ids"))
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
    if len(set(input_ids)) != n_ids:
        raise ModelError(f"{name}: an input id appears twice among the function's inputs")
    depth = _walk_tape(r, nodes, input_ids)
    for out in output_ids:
        if out not in depth:
            raise ModelError(f"{name}: output id {out} is defined by no node, input or constant")
    if r.left():
        raise ModelError(f"{name}: {r.left()} bytes trail the graph at byte {r.pos}")
    return {"nodes": nodes, "depth": max((depth[out] for out in output_ids), default=0)}


def _walk_tape(r: _Reader, nodes: int, input_ids) -> dict[int, int]:
    """Read every node of the tape in one pass (no recursion); return {id: depth} of every id it defines.

    Inputs and constants have depth 0, a primitive's outputs 1 + the deepest of its inputs. A node may
    only use ids defined before it (inputs, constants, earlier nodes' outputs): no forward, dangling or
    self reference, and no id is defined twice."""
    name = r.name
    inputs = set(input_ids)
    depth: dict[int, int] = {}
    for node in range(1, nodes + 1):
        where = f"node {node}"
        node_id, has_primitive = r.fields(_NODE, f"the id of {where}")
        if has_primitive > 1:
            raise ModelError(f"{name}: the has-primitive flag of {where} at byte {r.pos - 1} is {has_primitive}, "
                             "not a bool (0 or 1)")
        if has_primitive:
            n_args = r.count(f"inputs of {where}", MAX_NODE_INPUTS, 8)
            args = struct.unpack_from(f"<{n_args}Q", r.take(8 * n_args, f"the input ids of {where}"))
            deepest = 0
            for arg in args:
                d = depth.get(arg)
                if d is None:
                    raise ModelError(f"{name}: {where} (id {node_id}) takes input id {arg}, which no earlier "
                                     "node, input or constant defines")
                deepest = max(deepest, d)
            level = deepest + 1
            if level > MAX_DEPTH:
                raise ModelError(f"{name}: {where} lies {level} primitives deep, more than the {MAX_DEPTH} "
                                 "an exported function may have")
            stream_index, device_type, device_index, length = r.fields(_STREAM_NAME, f"the stream of {where}")
            if stream_index < 0 or device_type not in (0, 1) or not 0 <= device_index < MAX_DEVICES:
                raise ModelError(f"{name}: {where} runs on stream ({stream_index}, {device_type}, {device_index}), "
                                 "not an MLX stream")
            if length > MAX_PRIMITIVE_NAME_BYTES:
                raise ModelError(f"{name}: the primitive name of {where} of {length} bytes, more than "
                                 f"{MAX_PRIMITIVE_NAME_BYTES}")
            raw = r.take(length, f"the primitive name of {where}")
            layout = PRIMITIVES.get(raw.decode("ascii", "replace"))
            if layout is None:
                shown = f"'{raw.decode()}'" if raw.isascii() and raw.decode().isidentifier() else repr(raw)
                raise ModelError(f"{name}: {where} uses primitive {shown}, which this reader does not know "
                                 f"(MLX {', '.join(KNOWN_VERSIONS)})")
            if ARITY.get(raw.decode("ascii", "replace"), n_args) != n_args:
                raise ModelError(f"{name}: {where} gives {raw.decode()} {n_args} inputs; it takes "
                                 f"{ARITY[raw.decode()]}")
            if layout:
                _read_state(r, layout, f"the state of {where}'s {raw.decode()}")
            siblings = r.u64(f"the sibling count of {where}")
            if siblings == 0:
                r.tensor(f"the output of {where}")
                outs = (node_id,)
            else:
                if siblings >= MAX_NODE_OUTPUTS:
                    raise ModelError(f"{name}: {where} has {siblings + 1} outputs, more than {MAX_NODE_OUTPUTS}")
                n_ids = r.count(f"output ids of {where}", MAX_NODE_OUTPUTS, 8)
                outs = struct.unpack_from(f"<{n_ids}Q", r.take(8 * n_ids, f"the output ids of {where}"))
                n_shapes = r.count(f"output shapes of {where}", MAX_NODE_OUTPUTS, 8)
                for i in range(n_shapes):
                    r.shape(f"output {i + 1} of {where}")
                n_dtypes = r.count(f"output dtypes of {where}", MAX_NODE_OUTPUTS, 5)
                for i in range(n_dtypes):
                    r.dtype(f"output {i + 1} of {where}")
                if not n_ids == n_shapes == n_dtypes == siblings + 1 or node_id not in outs:
                    raise ModelError(f"{name}: {where} (id {node_id}) lists {n_ids} output ids (its own among "
                                     f"them: {node_id in outs}), {n_shapes} shapes and {n_dtypes} dtypes for "
                                     f"{siblings} siblings")
            for out in outs:
                if out in depth or out in inputs:
                    raise ModelError(f"{name}: {where} defines id {out} a second time")
                depth[out] = level
        elif r.boolean(f"the is-constant flag of {where}"):
            if node_id in depth or node_id in inputs:
                raise ModelError(f"{name}: {where} defines id {node_id} a second time")
            shape = r.shape(f"constant {where}")
            item, _ = r.dtype(f"constant {where}")
            nbytes = item * math.prod(shape)
            r.skip(nbytes, f"the {nbytes} bytes of constant {where} (shape {list(shape)})")
            depth[node_id] = 0
        else:
            if node_id not in inputs:
                raise ModelError(f"{name}: {where} refers to id {node_id} as a function input, but the "
                                 "function has no such input")
            depth[node_id] = 0
    return depth


def _read_state(r: _Reader, layout: tuple, what: str) -> None:
    """Read one primitive's state, element by element as MLX 0.32.4's serialize() writes it."""
    for kind in layout:
        if kind == "i32" or kind == "f32":
            r.skip(4, what)
        elif kind == "f64" or kind == "u64":
            r.skip(8, what)
        elif kind == "bool":
            r.boolean(what)
        elif kind == "dtype":
            r.dtype(what)
        elif kind in _VECTORS:
            n = r.count(f"items of {what}", MAX_STATE_ITEMS, _VECTORS[kind])
            r.skip(n * _VECTORS[kind], what)
        else:                                  # ("enum", number of values): an int, 0 <= value < n
            value = r.i32(what)
            if not 0 <= value < kind[1]:
                raise ModelError(f"{r.name}: {what} holds {value}, not one of its {kind[1]} enum values")


_VECTORS = {"ints": 4, "i64s": 8, "u64s": 8}      # std::vector / SmallVector: u64 count, then the items
