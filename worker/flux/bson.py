"""A strict reader for the plain BSON layer of BSON.jl files.

BSON.jl ignores document lengths, ignores array keys, keeps the last of two
duplicate keys and stops after the first document. A lenient reader can
therefore see a different tree than BSON.jl would load. This reader refuses
every such ambiguity, so what the scanner checks is exactly what BSON.jl
would build:

* each document's int32 length equals the bytes its elements use;
* array keys are exactly "0", "1", ... in order (BSON.jl writes them 0-based);
* no duplicate keys, keys and strings are valid UTF-8;
* only the element types BSON.jl writes (see ELEMENT_TYPES), binary subtype 0;
* no bytes after the top document;
* limits on file size, nesting depth, element count, key/string/binary sizes.

Result: documents are dicts (key order kept), arrays are lists, int32/int64
are `int` (BSON.jl's distinction does not matter to the scanner), double is
`float`, boolean `bool`, null `None`, string `str`, binary a zero-copy
`memoryview` of the input.
"""
from __future__ import annotations

import struct

MAX_FILE_BYTES = 1 << 30          # 1 GiB: bigger Flux BSON models are not expected
MAX_DEPTH = 100                   # real closure files nest 46 levels; models about 10
MAX_NODES = 200_000               # elements in the whole file; real files: under 2,000
MAX_KEY_BYTES = 1024
MAX_STRING_BYTES = 1 << 20
MAX_BINARY_BYTES = MAX_FILE_BYTES

# element type byte -> name; only what BSON.jl writes (write.jl)
ELEMENT_TYPES = {
    0x01: "double", 0x02: "string", 0x03: "document", 0x04: "array",
    0x05: "binary", 0x08: "boolean", 0x0A: "null", 0x10: "int32", 0x12: "int64",
}

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_DOUBLE = struct.Struct("<d")


class BsonError(ValueError):
    """The bytes are not strict BSON.jl-style BSON; the message names the byte offset and the rule."""


class _Reader:
    def __init__(self, data: bytes | memoryview):
        self.view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        self.size = len(self.view)
        self.nodes = 0

    def fail(self, offset: int, where: str, message: str) -> None:
        raise BsonError(f"bson: byte {offset} ({where}): {message}")

    def need(self, offset: int, count: int, where: str, what: str) -> None:
        if offset + count > self.size:
            self.fail(offset, where, f"{what} runs past the end of the file ({self.size} bytes)")

    def int32(self, offset: int, where: str, what: str) -> int:
        self.need(offset, 4, where, what)
        return _INT32.unpack_from(self.view, offset)[0]

    def cstring(self, offset: int, where: str) -> tuple[str, int]:
        # a key: bytes up to the first NUL
        limit = min(self.size, offset + MAX_KEY_BYTES + 1)
        raw = bytes(self.view[offset:limit])
        end = raw.find(b"\x00")
        if end < 0:
            if limit == self.size:
                self.fail(offset, where, "key is not NUL-terminated before the end of the file")
            self.fail(offset, where, f"key longer than {MAX_KEY_BYTES} bytes")
        try:
            key = raw[:end].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(offset, where, "key is not valid UTF-8")
        return key, offset + end + 1

    def document(self, offset: int, depth: int, where: str, is_array: bool):
        if depth > MAX_DEPTH:
            self.fail(offset, where, f"nesting deeper than {MAX_DEPTH} levels")
        length = self.int32(offset, where, "document length")
        if length < 5:
            self.fail(offset, where, f"document length {length} is below the minimum of 5")
        end = offset + length
        if end > self.size:
            self.fail(offset, where, f"document declares {length} bytes but the file ends {self.size - offset} bytes after its start")
        pos = offset + 4
        items: list = []
        result: dict = {}
        while True:
            if pos >= end:
                self.fail(pos, where, f"document declared {length} bytes long ends without its 0x00 terminator")
            etype = self.view[pos]
            if etype == 0x00:
                pos += 1
                break
            self.nodes += 1
            if self.nodes > MAX_NODES:
                self.fail(pos, where, f"more than {MAX_NODES} elements")
            type_at = pos
            if etype not in ELEMENT_TYPES:
                self.fail(pos, where, f"element type 0x{etype:02x} is not one BSON.jl writes")
            key, pos = self.cstring(pos + 1, where)
            child = f"{where}/{key}"
            if is_array:
                if key != str(len(items)):
                    self.fail(type_at, where, f"array key {key!r} where BSON.jl writes {str(len(items))!r}")
            elif key in result:
                self.fail(type_at, where, f"duplicate key {key!r}: BSON.jl keeps the last one, other readers the first")
            value, pos = self.value(etype, pos, depth, child)
            if pos > end:
                self.fail(type_at, child, f"element runs past the end of its document (declared {length} bytes at byte {offset})")
            if is_array:
                items.append(value)
            else:
                result[key] = value
        if pos != end:
            self.fail(offset, where, f"document declares {length} bytes but its elements end after {pos - offset}")
        return (items if is_array else result), pos

    def value(self, etype: int, pos: int, depth: int, where: str):
        if etype == 0x01:
            self.need(pos, 8, where, "double")
            return _DOUBLE.unpack_from(self.view, pos)[0], pos + 8
        if etype == 0x02:
            length = self.int32(pos, where, "string length")
            if length < 1 or length - 1 > MAX_STRING_BYTES:
                self.fail(pos, where, f"string length {length} outside 1..{MAX_STRING_BYTES + 1}")
            self.need(pos + 4, length, where, "string")
            raw = bytes(self.view[pos + 4:pos + 4 + length])
            if raw[-1] != 0:
                self.fail(pos, where, "string does not end with its 0x00 byte")
            try:
                text = raw[:-1].decode("utf-8")
            except UnicodeDecodeError:
                self.fail(pos, where, "string is not valid UTF-8")
            return text, pos + 4 + length
        if etype in (0x03, 0x04):
            return self.document(pos, depth + 1, where, etype == 0x04)
        if etype == 0x05:
            length = self.int32(pos, where, "binary length")
            if length < 0 or length > MAX_BINARY_BYTES:
                self.fail(pos, where, f"binary length {length} outside 0..{MAX_BINARY_BYTES}")
            self.need(pos + 4, 1 + length, where, "binary")
            subtype = self.view[pos + 4]
            if subtype != 0:
                self.fail(pos, where, f"binary subtype 0x{subtype:02x}; BSON.jl writes only 0x00")
            start = pos + 5
            return self.view[start:start + length], start + length
        if etype == 0x08:
            self.need(pos, 1, where, "boolean")
            flag = self.view[pos]
            if flag not in (0, 1):
                self.fail(pos, where, f"boolean byte 0x{flag:02x} is neither 0x00 nor 0x01")
            return flag == 1, pos + 1
        if etype == 0x0A:
            return None, pos
        if etype == 0x10:
            return self.int32(pos, where, "int32"), pos + 4
        # 0x12
        self.need(pos, 8, where, "int64")
        return _INT64.unpack_from(self.view, pos)[0], pos + 8


def parse(data: bytes | memoryview) -> dict:
    """Parse one strict BSON document that must span all of `data`; raise BsonError otherwise."""
    if len(data) > MAX_FILE_BYTES:
        raise BsonError(f"bson: file is {len(data)} bytes, above the limit of {MAX_FILE_BYTES}")
    reader = _Reader(data)
    doc, end = reader.document(0, 1, "top", is_array=False)
    if end != reader.size:
        raise BsonError(f"bson: byte {end} (top): {reader.size - end} trailing bytes after the top document")
    return doc
