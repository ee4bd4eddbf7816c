"""`sealbox scan FILE --format KIND`, inside the sandbox: the strict reader's verdict on one weights file.

Run by sandbox/tools.py scan_file (which picks KIND on the host from the file's first bytes and its name)
in exactly an MLX worker's sandbox, on a sealed memfd copy. The checks are the MLX engine's own before
mx.load / mx.import_function sees the bytes: for safetensors and GGUF the reader and check_for_mlx; for
.mlxfn check_file (size, version field, shapeless flag). The function's graph header (check_graph) is
checked against a model.json, which a lone file does not have: `sealbox scan` does not check it.

Prints "FILE: accepted (safetensors, N tensors, B bytes)" (GGUF: "GGUF vV"; .mlxfn: "mlxfn, MLX V")
or the reader's refusal, "FILE: defect", exactly as the daemon would log it.
Exit status: 0 accepted, 1 refused, 2 usage or I/O error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..engine import ModelError
from . import gguf, mlxfn, safetensors

KINDS = ("safetensors", "gguf", "mlxfn")


def _mlx_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mlx")
    except PackageNotFoundError:
        return "(none installed)"


def check(kind: str, path: str, name: str) -> dict:
    """The verdict's details for an accepted file; ModelError "NAME: defect" for a refused one."""
    size = os.stat(path).st_size
    if kind == "safetensors":
        header = safetensors.read_file(path, name)
        safetensors.check_for_mlx(header, name)
        return {"format": "safetensors", "tensors": len(header.tensors), "bytes": size,
                "summary": f"safetensors, {len(header.tensors)} tensors, {size} bytes"}
    if kind == "gguf":
        header = gguf.read_file(path, name)
        gguf.check_for_mlx(header, name)
        return {"format": "gguf", "version": header.version, "tensors": len(header.tensors), "bytes": size,
                "summary": f"GGUF v{header.version}, {len(header.tensors)} tensors, {size} bytes"}
    info = mlxfn.check_file(path, name, _mlx_version())
    return {"format": "mlxfn", "version": info["version"], "shapeless": info["shapeless"], "bytes": size,
            "summary": f"mlxfn, MLX {info['version']}, {'shapeless, ' if info['shapeless'] else ''}{size} bytes"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sealbox scan", description="Check a safetensors, GGUF or .mlxfn "
                                     "file with sealbox's strict readers, without loading it.")
    parser.add_argument("file")
    parser.add_argument("--format", required=True, choices=KINDS)
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.add_argument("--name", help="the name to report the file by (the sandbox sees only /proc/self/fd/N)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return 0 if exit_.code == 0 else 2
    name = args.name or args.file
    try:
        details = check(args.format, args.file, name)
    except OSError as err:
        print(f"sealbox scan: {name}: {err.strerror or err}", file=sys.stderr)
        return 2
    except ModelError as exc:
        if args.json:
            reason = str(exc).removeprefix(f"{name}: ")
            print(json.dumps({"file": name, "format": args.format, "status": "refused", "reason": reason},
                             ensure_ascii=False, indent=2))
        else:
            print(exc)
        return 1
    if args.json:
        summary = details.pop("summary")
        print(json.dumps({"file": name, "status": "accepted", **details, "summary": summary},
                         ensure_ascii=False, indent=2))
    else:
        print(f"{name}: accepted ({details['summary']})")
    return 0
