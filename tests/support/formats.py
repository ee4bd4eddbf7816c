"""Generators of well-formed and malformed model files (safetensors, GGUF, .mlxfn) for the format tests.

Every malformed file the tests use is made here, from scratch, at test time: no crafted binary is checked in.
Each SAFETENSORS_DEFECTS entry is (bytes, the defect the strict reader must name, after "FILE: ").
"""
from __future__ import annotations

import json
import struct

import numpy as np

from . import REPO


def safetensors_bytes(header: dict | str | bytes, data: bytes = b"", pad: bytes = b"") -> bytes:
    """A safetensors file: u64 header length, the header (a dict is dumped as JSON), padding, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    raw = header + pad
    return struct.pack("<Q", len(raw)) + raw + data


def f32(values) -> bytes:
    return np.asarray(values, np.float32).tobytes()


def mlp_weights(seed: int = 4) -> dict[str, np.ndarray]:
    """A 4 -> 8 -> 3 MLP for the built-in `mlp` architecture."""
    rng = np.random.default_rng(seed)
    return {"layers.0.weight": rng.standard_normal((8, 4)).astype(np.float32),
            "layers.0.bias": rng.standard_normal(8).astype(np.float32),
            "layers.1.weight": rng.standard_normal((3, 8)).astype(np.float32),
            "layers.1.bias": rng.standard_normal(3).astype(np.float32)}


def mlp_safetensors(weights: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """A well-formed header and data for weights, tensors in name order: what mx.save_safetensors writes."""
    header, data = {}, b""
    for name in sorted(weights):
        raw = weights[name].tobytes()
        header[name] = {"dtype": "F32", "shape": list(weights[name].shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


def _mutated(change) -> bytes:
    header, data = mlp_safetensors(mlp_weights())
    out = change(header, data)
    return out if isinstance(out, bytes) else safetensors_bytes(header, data)


def _dimension_past_2_32(header, data):
    # A plausible [3] bias, declared [2^32 + 3]: MLX 0.32 truncates dimensions to 32 bits and loads it as [3].
    header["layers.1.bias"]["shape"] = [2**32 + 3]


def _dimension_past_2_32_zero_sized(header, data):
    # The element count is 0 either way, so the byte range agrees; MLX would still load [3, 0].
    begin = header["layers.1.weight"]["data_offsets"][1]
    header["empty"] = {"dtype": "F32", "shape": [2**32 + 3, 0], "data_offsets": [begin, begin]}


def _float_offsets(header, data):
    header["layers.0.bias"]["data_offsets"] = [float(o) for o in header["layers.0.bias"]["data_offsets"]]


def _nul_padding(header, data):
    return safetensors_bytes(header, data, pad=b"\x00" * 6)


def _trailing_bytes(header, data):
    return safetensors_bytes(header, data + b"\x00" * 4)


def _overlap(header, data):
    # The example: a [32, 32] weight at [128, 4224) and a bias of 128 floats at [4096, 4608).
    weights = {"a": np.zeros(32, np.float32), "layers.0.weight": np.ones((32, 32), np.float32)}
    header = {"a": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]},
              "layers.0.weight": {"dtype": "F32", "shape": [32, 32], "data_offsets": [128, 4224]},
              "layers.0.bias": {"dtype": "F32", "shape": [128], "data_offsets": [4096, 4608]}}
    data = weights["a"].tobytes() + weights["layers.0.weight"].tobytes() + f32(np.arange(96))
    return safetensors_bytes(header, data)


def _not_utf8(header, data):
    text = json.dumps(header).replace("layers.0.bias", "layers.0.b\udcffas")
    return safetensors_bytes(text.encode("utf-8", "surrogateescape"), data)


def _duplicate_key(header, data):
    text = json.dumps(header)
    entry = json.dumps(header["layers.1.bias"])
    return safetensors_bytes(text[:-1] + f', "layers.1.bias": {entry}}}', data)


def _count_mismatch(header, data):
    header["layers.0.weight"]["shape"] = [4, 8]      # the same 32 elements, transposed: bytes agree
    header["layers.1.weight"]["shape"] = [3, 7]      # 21 elements in a range of 24


def _gap(header, data):
    bias = header["layers.0.bias"]
    bias["data_offsets"] = [bias["data_offsets"][0] + 4, bias["data_offsets"][1]]
    bias["shape"] = [7]


def _unknown_dtype(header, data):
    header["layers.0.bias"]["dtype"] = "Q4_K"


def _f8_dtype(header, data):
    header["layers.0.bias"]["dtype"] = "F8_E4M3"
    header["layers.0.bias"]["shape"] = [32]


def _negative_dimension(header, data):
    header["layers.1.bias"]["shape"] = [-3]


def _bool_dimension(header, data):
    header["layers.1.bias"]["shape"] = [True, 3]


def _metadata_not_string(header, data):
    header["__metadata__"] = {"format": "pt", "epochs": 3}


def _header_past_file(header, data):
    return struct.pack("<Q", 10_000) + b"{}"


def _header_too_large(header, data):
    return struct.pack("<Q", 2**40) + b"{}"


def _header_not_object(header, data):
    return safetensors_bytes("[1, 2]")


def _nan(header, data):
    return safetensors_bytes('{"__metadata__": {"x": NaN}}')


def _extra_key(header, data):
    header["layers.1.bias"]["offset"] = 3


# name -> (file bytes, the defect as the reader states it after "weights.safetensors: ")
SAFETENSORS_DEFECTS = {
    "dimension_past_2_32": (_mutated(_dimension_past_2_32),
                            "tensor 'layers.1.bias': shape [4294967299] of F32 needs more than 12 bytes, "
                            "but its data_offsets [160, 172) hold 12"),
    "dimension_past_2_32_zero_sized": (_mutated(_dimension_past_2_32_zero_sized),
                                       "tensor 'empty': shape [4294967299, 0]: dimension 4294967299 is larger "
                                       "than 2147483647 (MLX holds dimensions as 32-bit integers)"),
    "float_offsets": (_mutated(_float_offsets),
                      "tensor 'layers.0.bias': data_offsets must be two integers, not [0.0, 32.0]"),
    "nul_padding": (_mutated(_nul_padding),
                    "header is padded with NUL bytes (6 bytes after the JSON object; only spaces may pad it)"),
    "trailing_bytes": (_mutated(_trailing_bytes),
                       "4 bytes trail after the last tensor's data (the tensors end at data byte 268 of 272)"),
    "overlap": (_mutated(_overlap),
                "tensor 'layers.0.weight' bytes [128, 4224) overlap 'layers.0.bias' [4096, 4608)"),
    "not_utf8": (_mutated(_not_utf8),
                 "header is not valid UTF-8 (byte 12 of the header: invalid start byte)"),
    "duplicate_key": (_mutated(_duplicate_key), "header has the key 'layers.1.bias' twice"),
    "count_mismatch": (_mutated(_count_mismatch),
                       "tensor 'layers.1.weight': shape [3, 7] of F32 needs 84 bytes, "
                       "but its data_offsets [172, 268) hold 96"),
    "gap": (_mutated(_gap), "data bytes [0, 4) belong to no tensor (a gap before 'layers.0.bias')"),
    "unknown_dtype": (_mutated(_unknown_dtype), "tensor 'layers.0.bias': dtype \"Q4_K\" is not a safetensors dtype"),
    "f8_dtype": (_mutated(_f8_dtype),
                 "tensor 'layers.0.bias': dtype F8_E4M3 is not loadable by MLX as itself (MLX loads: BOOL, U8, "
                 "I8, I16, U16, F16, BF16, I32, U32, F32, I64, U64, C64)"),
    "negative_dimension": (_mutated(_negative_dimension),
                           "tensor 'layers.1.bias': shape [-3]: dimension -3 is not a non-negative integer"),
    "bool_dimension": (_mutated(_bool_dimension),
                       "tensor 'layers.1.bias': shape [true, 3]: dimension true is not a non-negative integer"),
    "metadata_not_string": (_mutated(_metadata_not_string), "__metadata__: 'epochs' must be a string, not 3"),
    "header_past_file": (_mutated(_header_past_file),
                         "header length 10000 runs past the end of the file (10 bytes)"),
    "header_too_large": (_mutated(_header_too_large),
                         "header length 1099511627776 is larger than 100000000 bytes"),
    "header_not_object": (_mutated(_header_not_object), "header does not start with '{'"),
    "nan": (_mutated(_nan), "header holds NaN, which is not JSON"),
    "extra_key": (_mutated(_extra_key), "tensor 'layers.1.bias': unknown keys ['offset']"),
}
# The defects the issue names, each loaded through a real daemon.
SAFETENSORS_DAEMON_DEFECTS = ("dimension_past_2_32", "dimension_past_2_32_zero_sized", "float_offsets",
                              "nul_padding", "trailing_bytes", "overlap", "not_utf8", "count_mismatch")


# ---- GGUF (see sealbox/worker/formats/gguf.py for the layout)

def _gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(tensors: list[tuple[str, list[int], int, bytes]], metadata: list[tuple[str, int, bytes]] = (),
               version: int = 3, alignment: int = 32, offsets: list[int] | None = None,
               tensor_count: int | None = None, trailing: bytes = b"") -> bytes:
    """A GGUF file. tensors: (name, dims in GGUF order (ne0 first), ggml type, data bytes);
    metadata: (key, value type, encoded value). Tensors are laid out in order, each aligned,
    unless offsets are given."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
                                len(metadata))
    for key, vtype, value in metadata:
        out += _gguf_string(key) + struct.pack("<I", vtype) + value
    data, placed = b"", []
    for _, _, _, raw in tensors:
        data += b"\x00" * (-len(data) % alignment)
        placed.append(len(data))
        data += raw
    offsets = placed if offsets is None else offsets
    for (name, dims, ggml_type, _), offset in zip(tensors, offsets):
        out += _gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\x00" * (-len(out) % alignment)
    return out + data + trailing


def gguf_mlp(weights: dict[str, np.ndarray] | None = None, **kwargs) -> bytes:
    """The MLP's weights as F32 tensors (GGUF dims are numpy's shape reversed)."""
    weights = mlp_weights() if weights is None else weights
    return gguf_bytes([(name, list(reversed(a.shape)), 0, a.tobytes()) for name, a in sorted(weights.items())],
                      **kwargs)


def _gguf_mlp_tensors(change=None):
    tensors = [[name, list(reversed(a.shape)), 0, a.tobytes()] for name, a in sorted(mlp_weights().items())]
    if change:
        change(tensors)
    return [tuple(t) for t in tensors]


def _gguf_zero_dimension(tensors):
    tensors.append(["extra", [4, 0], 0, b""])


def _gguf_invalid_type(tensors):
    tensors[2][2] = 99                    # layers.1.bias: MLX 0.32 returns the tensors before it, no error


U32 = 4


def gguf_metadata_u32(key: str, value: int) -> tuple[str, int, bytes]:
    return key, U32, struct.pack("<I", value)


# name -> (file bytes, the defect as the reader states it after "model.gguf: ")
GGUF_DEFECTS = {
    "zero_dimension": (gguf_bytes(_gguf_mlp_tensors(_gguf_zero_dimension)),
                       "tensor 'extra': dimensions [4, 0]: 0 is zero"),
    "invalid_type": (gguf_bytes(_gguf_mlp_tensors(_gguf_invalid_type)),
                     "tensor 'layers.1.bias': type 99 is not a ggml type"),
    "bad_magic": (b"GGUG" + gguf_bytes(_gguf_mlp_tensors())[4:], "magic b'GGUG' is not b'GGUF'"),
    "version_1": (gguf_bytes(_gguf_mlp_tensors(), version=1), "GGUF version 1 is not one this reader knows (2, 3)"),
    "big_endian": (gguf_bytes(_gguf_mlp_tensors(), version=3 << 24),
                   "GGUF version 50331648 is not one this reader knows (2, 3)"),
    "huge_tensor_count": (gguf_bytes(_gguf_mlp_tensors(), tensor_count=2**60),
                          "1152921504606846976 tensors and 0 metadata entries cannot fit in a file of 512 bytes"),
    "overlap": (gguf_bytes(_gguf_mlp_tensors(), offsets=[0, 0, 160, 192]),
                "tensor 'layers.0.bias' bytes [0, 32) overlap 'layers.0.weight' [0, 128)"),
    "gap": (gguf_bytes(_gguf_mlp_tensors(), offsets=[0, 64, 192, 224]),
            "data bytes [32, 64) belong to no tensor (a gap before 'layers.0.weight')"),
    "unaligned_offset": (gguf_bytes(_gguf_mlp_tensors(), offsets=[0, 32, 160, 176]),
                         "tensor 'layers.1.weight': offset 176 is not a multiple of the alignment 32"),
    "past_the_end": (gguf_bytes(_gguf_mlp_tensors())[:-8],
                     "tensor 'layers.1.weight' bytes [192, 288) run past the end of the data (280 bytes)"),
    "trailing_bytes": (gguf_bytes(_gguf_mlp_tensors(), trailing=b"\x00" * 40),
                       "40 bytes trail after the last tensor's data (the tensors end at data byte 288 of 328)"),
    "five_dimensions": (gguf_bytes(_gguf_mlp_tensors(lambda t: t.__setitem__(0, ["layers.0.bias", [8, 1, 1, 1, 1], 0,
                                                                                  t[0][3]]))),
                        "tensor 'layers.0.bias': 5 dimensions (GGUF allows 1 to 4)"),
    "dimension_past_2_31": (gguf_bytes(_gguf_mlp_tensors(lambda t: t[1].__setitem__(1, [4, 2**32 + 8]))),
                            "tensor 'layers.0.weight': dimensions [4, 4294967304]: 4294967304 is larger than "
                            "2147483647 (MLX holds dimensions as 32-bit integers)"),
    "block_size": (gguf_bytes([("q", [48], 2, b"\x00" * 27)]),
                   "tensor 'q': Q4_0 stores blocks of 32 elements, but ne0 = 48"),
    "duplicate_name": (gguf_bytes(_gguf_mlp_tensors(lambda t: t[3].__setitem__(0, "layers.1.bias"))),
                       "tensor 'layers.1.bias': the name appears twice"),
    "duplicate_key": (gguf_bytes(_gguf_mlp_tensors(), metadata=[gguf_metadata_u32("a", 1), gguf_metadata_u32("a", 2)]),
                      "metadata key 'a' appears twice"),
    "bad_alignment": (gguf_bytes(_gguf_mlp_tensors(), metadata=[gguf_metadata_u32("general.alignment", 24)]),
                      "general.alignment 24 is not a power of two up to 2^20"),
    "bad_bool": (gguf_bytes(_gguf_mlp_tensors(), metadata=[("flag", 7, b"\x02")]),
                 "metadata 'flag': bool byte 2 is neither 0 nor 1"),
    "huge_array": (gguf_bytes(_gguf_mlp_tensors(), metadata=[("arr", 9, struct.pack("<IQ", 8, 2**40))]),
                   "metadata 'arr': an array of 1099511627776 string values does not fit in the 493 bytes left"),
    "name_not_utf8": (gguf_bytes(_gguf_mlp_tensors(lambda t: t[0].__setitem__(0, "layers.0.b\udcffas".encode(
                          "utf-8", "surrogateescape")))),
                      "tensor name at byte 24: not valid UTF-8 (invalid start byte)"),
    "bf16_converted": (gguf_bytes([("h", [4], 30, b"\x00" * 8)]),
                       "tensor 'h': type BF16 is not loaded by MLX as itself (MLX loads: F32, F16, I8, I16, I32, "
                       "Q4_0, Q4_1, Q8_0)"),
}
GGUF_DAEMON_DEFECTS = ("zero_dimension", "invalid_type")


# ---- .mlxfn (see sealbox/worker/formats/mlxfn.py)

def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


F32_2X4 = struct.pack("<Q", 2) + struct.pack("<ii", 2, 4) + struct.pack("<iB", 10, 4)   # shape (2, 4), float32


def add_node(node_id: int, args, name: bytes = b"Add", state: bytes = b"") -> bytes:
    """One primitive node of a tape in MLX 0.32.4's layout: id, has-primitive, input ids, stream (0, cpu, 0),
    primitive name, its state, no siblings, output shape and dtype."""
    return (struct.pack("<QBQ", node_id, 1, len(args)) + struct.pack(f"<{len(args)}Q", *args)
            + struct.pack("<iii", 0, 0, 0) + _str(name) + state + struct.pack("<Q", 0) + F32_2X4)


def add_chain(nodes: int, wide: bool = False, tape: list[bytes] | None = None, output: int | None = None) -> bytes:
    """An .mlxfn in MLX 0.32.4's own layout (mlx/export.cpp): y = x + x + ... + x as `nodes` Add nodes, each
    adding the input to the previous node (wide: each adds the input to itself, a graph of depth 1).
    test_the_synthesised_chain_is_a_real_mlx_graph shows MLX imports and runs it: exporting a 200 000-node loop
    with mx.export_function takes minutes, writing it takes 0.3 s. tape: nodes to use instead of the Adds
    (the input's reference, id 1, comes first); output: the output id (default: the last node's)."""
    import mlx.core as mx
    if tape is None:
        tape = [add_node(i + 2, (1, 1) if wide else (i + 1, 1)) for i in range(nodes)]
    out = [_str(mx.__version__.encode()), struct.pack("<i", 1), b"\x01", _str(b""), struct.pack("<Q", 0)]
    out += [struct.pack("<QQ", 1, 1), struct.pack("<Q", 1), F32_2X4]          # input ids [1], input (2, 4) f32
    out += [struct.pack("<QQ", 1, output or len(tape) + 1), struct.pack("<Q", len(tape) + 1)]  # output, tape size
    out.append(struct.pack("<QBB", 1, 0, 0))                                   # the input, referenced
    return b"".join(out + tape)


def mlxfn_with_version(data: bytes, version: bytes) -> bytes:
    """An exported function's bytes with another version field."""
    (length,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", len(version)) + version + data[8 + length:]


def mutated_mlxfn(data: bytes, seed: int) -> bytes:
    """An exported function's bytes with two bytes of its graph changed (the version field is left alone)."""
    rng = np.random.default_rng(seed)
    mutated = bytearray(data)
    for _ in range(2):
        mutated[int(rng.integers(14, len(mutated)))] = int(rng.integers(0, 256))
    return bytes(mutated)


_CRASH_SEARCH = """
import json, os, signal, sys
import numpy as np
import mlx.core as mx
from tests.support.formats import mutated_mlxfn
data = open(sys.argv[1], "rb").read()
tries, model = int(sys.argv[2]), sys.argv[3]
if model:   # only mutants the strict reader accepts, imported and then called as the worker's warm-up does
    from sealbox.worker.engine import ModelError, TensorSpec
    from sealbox.worker.formats import mlxfn
    meta = json.load(open(os.path.join(model, "model.json")))
    inputs = [TensorSpec.from_json(t, "inputs") for t in meta["inputs"]]
    outputs = [TensorSpec.from_json(t, "outputs") for t in meta["outputs"]]
    weights_path = os.path.join(model, meta["weights"])
    keywords = {k: (v.ndim, "FP32") for k, v in mx.load(weights_path).items()}
found = []
for seed in range(tries):
    path = sys.argv[1] + ".candidate"
    with open(path, "wb") as f:
        f.write(mutated_mlxfn(data, seed))
    if model:
        try:
            mlxfn.check_file(path, "model.mlxfn", mx.__version__)
            mlxfn.check_graph(path, "model.mlxfn", inputs, outputs, keywords)
        except ModelError:
            continue
    pid = os.fork()
    if pid == 0:
        os.close(2)
        if model:
            signal.alarm(5)   # a mutant whose calls loop for ever is no crash
        try:
            fn = mx.import_function(path)
            if model:
                weights = mx.load(weights_path)
                for size in (2, 3):
                    mx.eval(fn(mx.zeros((size, 4)), **weights))
        except Exception:
            pass
        os._exit(0)
    _, status, usage = os.wait4(pid, 0)
    if model and usage.ru_maxrss > 512 * 1024:
        continue              # nor is one that allocates gigabytes (the worker's memory limit ends it)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGALRM:
        found.append(seed)
        if len(found) == (5 if model else 3):
            break
print(" ".join(map(str, found)))
"""


def crashing_mlxfn_seeds(data: bytes, tries: int = 3000, model: str = "") -> list[int]:
    """Seeds of mutated_mlxfn(data, seed) on which MLX 0.32.4's mx.import_function dies of a signal
    (SIGSEGV, or SIGABRT on heap corruption), found by trying them in forked children of one process:
    about 1 in 100 two-byte mutations of the demo graph. The graph holds per-process ids, so the search
    runs on the very bytes the test uses.

    With model (the directory of the model the graph belongs to: model.json, weights): only mutants that
    worker/formats/mlxfn.py's strict reader accepts, and a crash at import or in the warm-up calls (batch 2
    and 3, zeros) counts: about 1 in 5000 mutants of the demo graph."""
    import pathlib
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "graph.mlxfn"
        path.write_bytes(data)
        out = subprocess.run([sys.executable, "-c", _CRASH_SEARCH, str(path), str(tries), model],
                             capture_output=True, text=True, timeout=600,
                             env={"MLX_DISABLE_COMPILE": "1", "MALLOC_ARENA_MAX": "2", "PATH": "/usr/bin:/bin",
                                  "PYTHONPATH": str(REPO)})
    return [int(seed) for seed in out.stdout.split()]
