"""A Seatbelt (sandbox-exec / sandbox_init) profile for a worker on macOS.

Deny by default; allow reading the system libraries every process needs, the
Python runtime, sealbox's code and the verified model paths; writing only
beneath the read-write paths (the socket directory and a private temp
directory); no network except the worker's own Unix socket; the IOKit and
Mach services MLX's Metal backend uses; no fork, no exec.

With exec_once=None the profile is meant for the worker to apply to itself
once started (sandbox_init), so no exec at all is allowed. sandbox-exec
applies a profile *before* it execs the command: pass the interpreter as
exec_once to allow exactly that one binary.

Seatbelt matches resolved paths (/tmp is /private/tmp), so paths are
resolved first. A path with a double quote or a control character is
refused rather than escaped: it has no business naming a model or runtime.
"""
from __future__ import annotations

import os

# Read-only system locations any dynamically linked process needs (dyld caches, libSystem,
# frameworks such as Metal and Accelerate, GPU driver bundles in /System/Library/Extensions).
SYSTEM_READ_ONLY = (
    "/usr/lib",
    "/System/Library",
    "/System/Cryptexes",
    "/System/Volumes/Preboot/Cryptexes",
    "/private/var/db/dyld",
    "/Library/Apple/System/Library",
)
SYSTEM_READ_FILES = ("/dev/null", "/dev/urandom", "/dev/random")

# MLX's Metal backend: the shader compiler service, and the GPU's user clients.
METAL_MACH_SERVICES = ("com.apple.MTLCompilerService",)
METAL_IOKIT_CLIENTS = ("AGXDeviceUserClient", "AGXSharedUserClient", "IOGPUDeviceUserClient",
                       "IOSurfaceRootUserClient")


class ProfileError(ValueError):
    """macos: a path cannot be put in a Seatbelt profile (the message says which and why)."""


def _quote(path: str) -> str:
    """An SBPL string literal for path; backslashes are escaped, quotes and controls refused."""
    if '"' in path or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        raise ProfileError(f"macos: path {path!r} contains a double quote or a control character")
    return '"' + path.replace("\\", "\\\\") + '"'


def _resolve(path: str) -> str:
    if not os.path.isabs(path):
        raise ProfileError(f"macos: path {path!r} is not absolute")
    _quote(path)  # refuse before resolving: realpath must not launder a bad name
    return os.path.realpath(path)


def _ancestors(path: str) -> list[str]:
    """Every directory above path, for metadata reads (realpath, imports stat each component)."""
    out, parent = [], os.path.dirname(path)
    while True:
        out.append(parent)
        if parent == "/":
            return out
        parent = os.path.dirname(parent)


def seatbelt_profile(read_only: list[str], read_write: list[str], socket_path: str,
                     exec_once: str | None = None) -> str:
    """The SBPL text confining a worker to these paths and its Unix socket."""
    ro = [_resolve(p) for p in read_only]
    rw = [_resolve(p) for p in read_write]
    sock = _resolve(socket_path)
    if not any(sock == d or sock.startswith(d.rstrip("/") + "/") for d in rw):
        raise ProfileError(f"macos: socket {sock!r} is not beneath a read-write path {rw}")
    readable = [*SYSTEM_READ_ONLY, *ro, *rw]
    metadata = sorted({a for p in readable for a in _ancestors(p)} - set(readable))

    def rule(action: str, operation: str, filters: list[str]) -> str:
        return f"({action} {operation}\n" + "".join(f"  {f}\n" for f in filters) + ")"

    lines = [
        "(version 1)",
        "(deny default)",
        ";; reading: system libraries, the Python runtime, sealbox's code, the verified model",
        rule("allow", "file-read*", [f"(subpath {_quote(p)})" for p in readable]
             + [f"(literal {_quote(p)})" for p in SYSTEM_READ_FILES]),
        rule("allow", "file-read-metadata", [f"(literal {_quote(p)})" for p in metadata]),
        ";; writing: the socket directory and the private temp directory only",
        rule("allow", "file-write*", [f"(subpath {_quote(p)})" for p in rw]),
        ";; network: only the worker's own Unix socket",
        rule("allow", "network-bind network-inbound",
             [f"(local unix-socket (path-literal {_quote(sock)}))"]),
        ";; MLX on Metal: GPU user clients and the shader compiler service",
        "(allow iokit-get-properties)",
        rule("allow", "iokit-open", [f'(iokit-user-client-class "{c}")' for c in METAL_IOKIT_CLIENTS]),
        rule("allow", "mach-lookup", [f'(global-name "{s}")' for s in METAL_MACH_SERVICES]),
        "(allow sysctl-read)",
        ";; threads, and signals to itself only",
        "(allow process-info* (target self))",
        "(allow signal (target self))",
    ]
    if exec_once is not None:
        lines += [";; sandbox-exec applies this before exec'ing the worker: that one binary only",
                  f"(allow process-exec (literal {_quote(_resolve(exec_once))}))"]
    else:
        lines += [";; no exec once the worker runs", "(deny process-exec)"]
    lines += ["(deny process-fork)"]
    return "\n".join(lines) + "\n"
