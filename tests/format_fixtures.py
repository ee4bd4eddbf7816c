"""Generators of well-formed and malformed model files (safetensors, GGUF, .mlxfn) for the format tests.

Every malformed file the tests use is made here, from scratch, at test time: no crafted binary is checked in.
Each SAFETENSORS_DEFECTS entry is (bytes, the defect the strict reader must name, after "FILE: ").
"""
from __future__ import annotations

import json
import struct

import numpy as np


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
