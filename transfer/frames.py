"""The fetch helper's pipe protocol, both directions, read strictly on the root side.

Root -> helper: one JSON line per request, {"op": "metadata", "name", "limit"} or
{"op": "stream", "name", "offset"} (the root writes it; the helper reads it).
Helper -> root: frames of a 1-byte kind, a 4-byte big-endian length and the payload:

    D  data bytes of the current file (at most MAX_DATA)
    E  the request is done; payload: the peer (UTF-8) for the audit log
    A  metadata only: the location has no such file (HTTP 404)
    I  interrupted (transient); payload: 1 byte restart flag, then the reason (UTF-8)
    R  refused (permanent); payload: the reason (UTF-8)

The root never parses JSON, HTTP or TLS from the helper: only these frames, bounded.
"""
from __future__ import annotations

import struct

MAX_DATA = 1 << 20
MAX_TEXT = 4096
KINDS = b"DEAIR"
_HEADER = struct.Struct(">cI")


class FrameError(Exception):
    """The helper broke the protocol (or died): nothing it sent is trusted further."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def _read_exact(stream, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise FrameError("the fetch helper ended mid-frame" if got or chunks else "the fetch helper ended")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(stream) -> tuple[bytes, bytes]:
    kind, length = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    if kind not in (bytes([k]) for k in KINDS):
        raise FrameError(f"the fetch helper sent an unknown frame kind {kind!r}")
    if length > (MAX_DATA if kind == b"D" else MAX_TEXT):
        raise FrameError(f"the fetch helper sent a {kind.decode()} frame of {length} bytes, over its bound")
    return kind, _read_exact(stream, length) if length else b""


def text(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")
