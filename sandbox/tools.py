"""Operator tools that run inside exactly a worker's sandbox: `sealbox scan` (BSON.jl, safetensors, GGUF, .mlxfn)
and `sealbox sandbox run-python`."""
from __future__ import annotations

import os
import re
import stat
import sys

from ..proto.contract import MEMFD_SEALS, ToolRun
from .launcher import SandboxUnavailable, run_tool
from .profile import SandboxProfile

SCRIPT_IN_SANDBOX = "/run/sealbox-tool/script.py"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r}: use a number with an optional K, M or G suffix (e.g. 512M)")
    return int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]


def _require_root(tool: str) -> None:
    if os.geteuid() != 0:
        raise SystemExit(f"sealbox {tool}: must run as root (it drops to the worker user inside the sandbox)")


def run_python(script: str, args: list[str], engine: str = "mlx", memory: str | None = None) -> int:
    _require_root("sandbox run-python")
    profile = SandboxProfile.for_model(engine, **({"memory_bytes": parse_size(memory)} if memory else {}))
    try:
        with open(script, "rb") as f:
            source = f.read()
    except OSError as exc:
        print(f"sealbox sandbox run-python: {script}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        return run_tool(profile, ToolRun("script", SCRIPT_IN_SANDBOX, tuple(args)),
                        extra_files={SCRIPT_IN_SANDBOX: source})
    except SandboxUnavailable as exc:
        print(f"sealbox sandbox run-python: {exc}", file=sys.stderr)
        return 2


def sealed_copy(path: str, max_bytes: int = 1 << 30) -> int:
    """The file's bytes in a sealed memfd: what a worker may read (Landlock keeps it off host paths)."""
    import fcntl
    fd = os.memfd_create("scan", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW | os.O_NONBLOCK)) as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):  # never block on a FIFO or read a device
                raise OSError(22, "not a regular file")
            while chunk := src.read(1 << 20):
                if os.lseek(fd, 0, os.SEEK_CUR) + len(chunk) > max_bytes:
                    raise OSError(27, f"larger than {max_bytes} bytes")
                os.write(fd, chunk)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
        return fd
    except BaseException:
        os.close(fd)
        raise


MLXFN_VERSION = re.compile(rb"[0-9]+\.[0-9]+\.[0-9]+[0-9a-z.+-]*")
SUFFIXES = {".safetensors": "safetensors", ".gguf": "gguf", ".mlxfn": "mlxfn"}


def scan_kind(head: bytes, path: str) -> str:
    """Which reader scans the file: "safetensors", "gguf", "mlxfn" or "bson", from its first bytes
    (at most 40 are looked at; nothing is parsed on the host) and, failing that, its name's suffix."""
    if head[:4] == b"GGUF":
        return "gguf"
    if head[8:9] == b"{":                     # u64 header length, then the JSON header's '{'
        return "safetensors"
    if len(head) >= 9:                        # u64 version length, then an MLX version ("0.32.4")
        length = int.from_bytes(head[:8], "little")
        if 1 <= length <= 32 and MLXFN_VERSION.fullmatch(head[8:8 + length]):
            return "mlxfn"
    return SUFFIXES.get(os.path.splitext(path)[1].lower(), "bson")


def scan_file(path: str, as_json: bool = False) -> int:
    """The file's strict reader (BSON.jl scanner, safetensors, GGUF or .mlxfn), run confined in exactly the
    sandbox of the worker that would load it: the file is hostile until scanned."""
    _require_root("scan")
    try:
        fd = sealed_copy(path)
    except OSError as exc:
        print(f"sealbox scan: {path}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        kind = scan_kind(os.pread(fd, 40, 0), path)
        args = [f"/proc/self/fd/{fd}", "--name", path] + (["--json"] if as_json else [])
        if kind == "bson":
            engine, module, slot = "flux", "sealbox.worker.flux.scan_cli", "model.bson"
        else:
            engine, module, slot = "mlx", "sealbox.worker.formats.scan_cli", f"model.{kind}"
            args += ["--format", kind]
        code = run_tool(SandboxProfile.for_model(engine), ToolRun("module", module, tuple(args)),
                        files={slot: fd})
    except SandboxUnavailable as exc:
        print(f"sealbox scan: {exc}", file=sys.stderr)
        return 2
    finally:
        os.close(fd)
    return code if code in (0, 1, 2) else 2
