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

Checked here: the file's size (MAX_BYTES, before anything else is read), the version field's length
and characters, and that the version is one this reader was written for (KNOWN_VERSIONS) and is the
running MLX's version. The graph itself (node count, depth, arity) is NOT parsed yet: past the version
field the file goes to MLX as it is. The engine then refuses a function that does not accept the
declared inputs (warm-up calls at two batch sizes when a dimension is -1).
"""
from __future__ import annotations

import os
import struct

from ..engine import ModelError

KNOWN_VERSIONS = ("0.32.4",)      # the MLX versions whose .mlxfn layout the notes above describe
MAX_BYTES = 256 * 2**20           # graphs with weights passed as inputs are kilobytes; constants make them grow
MAX_VERSION_BYTES = 32
SHAPELESS_FLAG_OFFSET = 4         # after the version string


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
