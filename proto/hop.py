"""The supervisor <-> worker hop: one small framed protocol over the worker's Unix socket.

Both sides import this module and nothing else of each other; it imports neither grpc nor numpy
(the worker needs no gRPC at all). The socket is AF_UNIX SOCK_SEQPACKET: the kernel keeps record
boundaries, and a record may carry file descriptors (SCM_RIGHTS).

A record is a fixed header, then `side` bytes of per-call side data, then the body:

    kind u8 | flags u8 | code u16 | call id u32 | side length u32 | body length u64   (little-endian)

    DESCRIBE        supervisor -> worker   body empty
    DESCRIBE_REPLY  worker -> supervisor   body = serialized ModelMetadataResponse
    INFER           supervisor -> worker   body = the public ModelInferRequest bytes, untouched;
                                           flag STREAM when it came through ModelStreamInfer
    RESPONSE        worker -> supervisor   body = ModelInferResponse bytes, untouched; FINAL on the last
                                           (a FINAL one with an empty body ends a decoupled stream
                                           without a response of its own)
    ERROR           worker -> supervisor   code = a gRPC status code, body = UTF-8 message; ends the call
    CANCEL          supervisor -> worker   the client went away: drop the call (it still ends with a record)
    LOAD            supervisor -> worker   a warm-pool worker's model, once, on a connection of its own:
                                           body = the ModelHandoff as JSON, files naming attached fds by
                                           index; the fds = the model's sealed memfds (send_load/recv_load)

Every INFER ends with exactly one terminal record (RESPONSE with FINAL, or ERROR), so both sides
can count the calls in flight. The worker takes calls strictly in the order they arrive.

A body longer than INLINE_MAX travels as a sealed memfd (contract.MEMFD_SEALS) attached to the
record (flag MEMFD, the body length in the header, nothing inline): the receiver checks its
seals and size, maps it read-only and closes the descriptor. An INFER's body may instead sit at the
start of one of the supervisor's input arenas (below: sealed with contract.ARENA_SEALS, at least as
large as the body), which it reuses for that worker's calls; the worker maps exactly the body's length.
The final RESPONSE to such a call may have its body in the call's response arena instead (below,
RESPONSE_ARENA). Side data is reserved for per-call
extras (a batching worker's EXECUTION on a final RESPONSE, an INFER's shared-memory input sizes;
bounded); fds beyond the one memfd are the shared-memory tensors' (flag SHM, below), at most MAX_FDS.

Everything read is bounded: the body length against the receiver's max message bytes, side data
against MAX_SIDE, inline bodies against INLINE_MAX, at most MAX_FDS descriptors; an unknown kind
or flag, a truncated record, a wrong fd count or a memfd whose size or seals differ is a
ProtocolError, after which the receiver closes the connection.
"""
from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import stat
import struct
import threading
from typing import NamedTuple

from .contract import ARENA_SEALS, MEMFD_SEALS, SIZE_SEALS

HEADER = struct.Struct("<BBHIIQ")

DESCRIBE, DESCRIBE_REPLY, INFER, RESPONSE, ERROR, CANCEL = 1, 2, 3, 4, 5, 6
LOAD = 7   # supervisor -> a warm-pool worker, once: send_load / recv_load (never through recv)
KIND_NAMES = {DESCRIBE: "DESCRIBE", DESCRIBE_REPLY: "DESCRIBE_REPLY", INFER: "INFER", RESPONSE: "RESPONSE",
              ERROR: "ERROR", CANCEL: "CANCEL", LOAD: "LOAD"}
TO_WORKER = frozenset({DESCRIBE, INFER, CANCEL})
TO_SUPERVISOR = frozenset({DESCRIBE_REPLY, RESPONSE, ERROR})

FINAL = 0x01    # RESPONSE: the call's last record
STREAM = 0x02   # INFER: came through ModelStreamInfer (the engine may answer several times)
MEMFD = 0x04    # the body is the attached sealed memfd
SHM = 0x08      # INFER / final RESPONSE: shared-memory tensors attached (see below)
KNOWN_FLAGS = FINAL | STREAM | MEMFD | SHM

# Bodies up to this size travel inline (one sendmsg copy); above it a sealed memfd is cheaper than
# pushing the bytes through the socket (benchmarks/bench_hop.py measures the crossover). A record
# must also fit the socket's send buffer, which is why inline bodies stay well below the usual
# 208 KiB default.
INLINE_MAX = 64 * 1024
MAX_SIDE = 4096
# Shared-memory tensors (Triton's system shared-memory extension, daemon/shared_memory.py) cross in
# the supervisor's arenas (memfds it reuses for one worker, call after call; never the client's region):
# with flag SHM, an INFER carries one arena per tensor that names a region, after the body's own memfd,
# and its side data one SHM_SIZE entry per arena, in the same order: an input's byte size (its arena is
# sealed with contract.ARENA_SEALS, written by no one but the supervisor's own mapping; the worker maps
# exactly that many bytes, read-only), or OUTPUT_ARENA (an arena sealed against size changes that the
# worker writes an output into, from its start). Inputs and outputs each keep request order. The final
# RESPONSE to such a call is flagged SHM and carries no descriptor: its side data starts with one
# SHM_SIZE per output arena, the bytes the output has (written only when they fit the arena),
# followed by anything else the side data holds (EXECUTION).
# A unary INFER whose body is large (in an input arena) also carries, the same way, one RESPONSE_ARENA:
# an arena sealed against size changes for the response body. If the body is longer than INLINE_MAX
# and fits with RESPONSE_TAIL_ROOM bytes to spare, the worker writes it there from the start and its
# final RESPONSE carries no body; that arena's SHM_SIZE entry (after the outputs') is the body's length,
# or 0 when the body travels in the record as usual. The supervisor writes its own parameters into the
# spare room and reads body and parameters back with one pread, never through a mapping; the worker can
# still write the arena meanwhile, so the supervisor checks the copy (a fresh memfd's pages cost ~74 ms
# per 64 MiB here, rewriting an arena's ~17).
MAX_SHM_FDS = 32   # 16 inputs and 16 outputs (daemon/shared_memory.py)
SHM_SIZE = struct.Struct("<Q")
OUTPUT_ARENA = 2**64 - 1
RESPONSE_ARENA = 2**64 - 2
RESPONSE_TAIL_ROOM = 4096   # left free after a body in a response arena, for the supervisor's parameters
MAX_FDS = 1 + MAX_SHM_FDS
# A final RESPONSE's side data from a worker with dynamic batching: the engine call that answered
# it (rows in it, this response's index in it, its duration in ns); index 0 counts the execution.
EXECUTION = struct.Struct("<IIQ")
# INFER calls a worker holds (queued, running, or answered and not yet released); beyond, a
# ProtocolError. The supervisor's gate keeps at most half this many in flight per worker: the other
# half covers calls already answered that the worker has not counted off yet.
MAX_QUEUED_CALLS = 128
MAX_ERROR_BYTES = 4096   # an ERROR's message; the supervisor shows at most errors.MAX_DETAIL of it
_RECV_BYTES = HEADER.size + MAX_SIDE + INLINE_MAX
_RECV_ANC = socket.CMSG_SPACE(4 * (MAX_FDS + 1))   # room to SEE one fd too many (and refuse it)

# gRPC status codes the worker sends in ERROR records (numbers from grpc's status.proto).
OK, CANCELLED, INVALID_ARGUMENT, INTERNAL = 0, 1, 3, 13


class ProtocolError(Exception):
    """A malformed record: the connection is closed."""


class Closed(ConnectionError):
    """The peer closed the connection (or it was closed under us)."""


class Record(NamedTuple):
    kind: int
    flags: int
    code: int
    call_id: int
    side: bytes
    body: object   # bytes (inline) or a read-only mmap (MEMFD): the receiver closes it
    shm: tuple = ()       # an INFER's SHM inputs: one read-only mapping (or b"" when empty) each
    outputs: tuple = ()   # an INFER's SHM output arenas: descriptors, closed by release()
    response_arena: int | None = None   # an INFER's RESPONSE_ARENA: a descriptor, closed by release()

    def release(self) -> None:
        release(self.body)
        for view in self.shm:
            release(view)
        for fd in self.outputs:
            os.close(fd)
        if self.response_arena is not None:
            os.close(self.response_arena)

    @property
    def final(self) -> bool:
        return bool(self.flags & FINAL)


def header(kind: int, call_id: int, length: int, flags: int = 0, code: int = 0, side: int = 0) -> bytes:
    return HEADER.pack(kind, flags, code, call_id, side, length)


def body_memfd(parts) -> int:
    """A sealed memfd holding the concatenated parts (bytes-like), the caller closes it."""
    fd = os.memfd_create("sealbox-hop", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Outgoing:
    """One record ready to send: its buffers and, for a large body, the sealed memfd carrying it.
    Made once, sent with `send_on` (a non-blocking sender retries the same record); close() after."""
    __slots__ = ("buffers", "ancillary", "fd", "shm_fds")

    def __init__(self, kind: int, call_id: int, parts=(), flags: int = 0, code: int = 0, side: bytes = b"",
                 shm_fds=(), body_arena: tuple[int, int] | None = None):
        """`body_arena` = (fd, length): an INFER whose body (longer than INLINE_MAX) the caller has
        already written into an input arena; `parts` is then empty."""
        if len(side) > MAX_SIDE:
            raise ValueError(f"side data of {len(side)} bytes, at most {MAX_SIDE}")
        if len(shm_fds) > MAX_SHM_FDS:
            raise ValueError(f"{len(shm_fds)} shared-memory tensors, at most {MAX_SHM_FDS}")
        length = sum(memoryview(p).nbytes for p in parts) if body_arena is None else body_arena[1]
        self.fd, self.shm_fds = None, []
        try:   # descriptors ours until sent (the caller may close its own); none kept if one cannot be made
            for fd in shm_fds:
                self.shm_fds.append(os.dup(fd))
            if length > INLINE_MAX:
                self.fd = body_memfd(parts) if body_arena is None else os.dup(body_arena[0])
        except BaseException:
            self.close()
            raise
        if shm_fds:
            flags |= SHM
        if length > INLINE_MAX:
            flags |= MEMFD
            self.buffers = [header(kind, call_id, length, flags, code, len(side)), side]
            fds = [self.fd, *self.shm_fds]
        else:
            self.buffers = [header(kind, call_id, length, flags, code, len(side)), side, *parts]
            fds = self.shm_fds
        self.ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []

    def send_on(self, sock: socket.socket) -> None:
        """One sendmsg: a SEQPACKET record goes whole or not at all (BlockingIOError: retry)."""
        sock.sendmsg(self.buffers, self.ancillary)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        while self.shm_fds:
            os.close(self.shm_fds.pop())


def send(sock: socket.socket, kind: int, call_id: int, parts=(), flags: int = 0, code: int = 0,
         side: bytes = b"", shm_fds=()) -> None:
    """Send one record on a blocking socket."""
    record = Outgoing(kind, call_id, parts, flags, code, side, shm_fds)
    try:
        record.send_on(sock)
    finally:
        record.close()


def send_error(sock: socket.socket, call_id: int, code: int, message: str) -> None:
    send(sock, ERROR, call_id, [message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]], code=code)


def recv(sock: socket.socket, max_body: int, kinds: frozenset = TO_WORKER | TO_SUPERVISOR) -> Record:
    """Receive and check one record. Closed at end of stream; ProtocolError (the caller closes the
    connection) for anything malformed; BlockingIOError on a non-blocking socket with nothing to read.
    Every descriptor received is closed or owned by the returned mmap, whatever happens."""
    buffer = _receive_buffer()
    n, ancdata, msg_flags, _ = sock.recvmsg_into([buffer], _RECV_ANC)
    data = memoryview(buffer)[:n]
    fds = _fds(ancdata)
    try:
        if not data and not fds:
            raise Closed("connection closed by the peer")
        return _decode(data, msg_flags, fds, max_body, kinds)
    finally:
        for fd in fds:
            os.close(fd)


_buffers = threading.local()


def _receive_buffer() -> bytearray:
    """This thread's receive buffer, reused for every record: recvmsg() would allocate (and, above the
    daemon's malloc mmap threshold, mmap and unmap) a buffer of the largest record for each call."""
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = bytearray(_RECV_BYTES)
    return buffer


def _fds(ancdata) -> list[int]:
    fds = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(payload[:len(payload) - len(payload) % ints.itemsize])
            fds.extend(ints)
    return fds


def _decode(data: memoryview, msg_flags: int, fds: list[int], max_body: int, kinds: frozenset) -> Record:
    if msg_flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
        raise ProtocolError(f"more than {MAX_FDS} file descriptor(s) attached to a record")
    if msg_flags & socket.MSG_TRUNC:
        raise ProtocolError(f"record longer than {_RECV_BYTES} bytes")
    if len(data) < HEADER.size:
        raise ProtocolError(f"record of {len(data)} bytes, shorter than the {HEADER.size}-byte header")
    kind, flags, code, call_id, side_len, length = HEADER.unpack_from(data)
    if kind not in kinds:
        raise ProtocolError(f"unexpected record kind {kind}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown flags {flags:#x} on a {KIND_NAMES[kind]} record")
    if side_len > MAX_SIDE:
        raise ProtocolError(f"side data of {side_len} bytes, at most {MAX_SIDE}")
    if length > max_body:
        raise ProtocolError(f"{KIND_NAMES[kind]} body of {length} bytes, above the limit of {max_body}")
    side = bytes(data[HEADER.size:HEADER.size + side_len])
    inline = HEADER.size + side_len
    body_fds, shm_fds = (fds[:1], fds[1:]) if flags & MEMFD else ([], fds)
    if flags & SHM:
        if kind not in (INFER, RESPONSE):
            raise ProtocolError(f"shared-memory tensors on a {KIND_NAMES[kind]} record")
        if kind == INFER and not shm_fds:
            raise ProtocolError("shared-memory tensors flagged, none attached")
        if kind == RESPONSE and shm_fds:
            raise ProtocolError("a response's shared-memory outputs are in the supervisor's arenas, "
                                "not in descriptors of its own")
    elif shm_fds:
        raise ProtocolError("more than 1 file descriptor(s) attached to a record" if flags & MEMFD else
                            "file descriptor attached to a record without a memfd body")
    if flags & MEMFD:
        if len(body_fds) != 1 or len(data) != inline:
            raise ProtocolError("a memfd record needs exactly one descriptor and no inline body")
        if length <= INLINE_MAX:
            raise ProtocolError(f"memfd body of {length} bytes, which travels inline")
        body = _map_memfd(body_fds[0], length, arena=kind == INFER)
    else:
        if len(data) != inline + length:
            raise ProtocolError(f"record carries {len(data) - inline} body bytes, its header says {length}")
        body = bytes(data[inline:])
    shm, outputs, response_arena = [], [], None
    try:
        if shm_fds and len(side) != SHM_SIZE.size * len(shm_fds):
            raise ProtocolError(f"shared-memory tensors: {len(shm_fds)} attached, {len(side) / SHM_SIZE.size:g} "
                                "sizes in the side data")
        for i, fd in enumerate(shm_fds):
            size = SHM_SIZE.unpack_from(side, SHM_SIZE.size * i)[0]
            if size == OUTPUT_ARENA:
                _sealed(fd, (SIZE_SEALS,), "output arena")
                outputs.append(os.dup(fd))   # the received one is closed by recv()
                continue
            if size == RESPONSE_ARENA:
                if response_arena is not None:
                    raise ProtocolError("more than one response arena")
                _sealed(fd, (SIZE_SEALS,), "response arena")
                response_arena = os.dup(fd)
                continue
            if size > max_body:
                raise ProtocolError(f"a shared-memory tensor of {size} bytes, above the limit of {max_body}")
            shm.append(_map_arena(fd, size) if size else b"")
    except BaseException:
        release(body)
        for view in shm:
            release(view)
        for fd in outputs:
            os.close(fd)
        if response_arena is not None:
            os.close(response_arena)
        raise
    return Record(kind, flags, code, call_id, side, body, tuple(shm), tuple(outputs), response_arena)


def _sealed(fd: int, seal_sets: tuple, what: str) -> os.stat_result:
    """fstat of an attached memfd that carries every seal of one of `seal_sets`; ProtocolError otherwise."""
    try:   # (an O_PATH descriptor, say, fails both: the peer's error, not a socket failure to retry)
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if MEMFD_SEALS and stat.S_ISREG(st.st_mode) else 0
    except OSError as exc:
        raise ProtocolError(f"the attached descriptor cannot be checked ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError("the attached descriptor is not a memfd")
    if MEMFD_SEALS:
        if not any(seals & wanted == wanted for wanted in seal_sets):
            raise ProtocolError(f"the attached {what} is not sealed")
    return st


def _map_read_only(fd: int, length: int) -> mmap.mmap:
    # MAP_POPULATE: the pages are mapped in one call, not one fault each (measured faster for 64 MiB).
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)


def _map_memfd(fd: int, length: int, arena: bool = False) -> mmap.mmap:
    """A memfd body, read-only: exactly `length` bytes, or, with `arena` (an INFER's body may sit in an
    input arena), the first `length` bytes of an arena at least that large."""
    st = _sealed(fd, (MEMFD_SEALS, ARENA_SEALS) if arena else (MEMFD_SEALS,), "memfd")
    if st.st_size < length or (st.st_size != length and not arena):
        raise ProtocolError(f"the attached memfd holds {st.st_size} bytes, its header says {length}")
    if not arena and st.st_blocks * 512 < length:
        # Holes: mapping them (MAP_POPULATE) would allocate the pages for the RECEIVER, charged to it
        # (the root process, for a worker's body) and kept while the sender holds the memfd. The sender
        # writes every byte (body_memfd); the write seal keeps holes from being punched later.
        raise ProtocolError(f"the attached memfd has holes: {st.st_blocks * 512} of its {length} bytes written")
    return _map_read_only(fd, length)


def _map_arena(fd: int, length: int) -> mmap.mmap:
    """The first `length` bytes of an input arena, read-only: sealed so that no one but the supervisor
    writes it and its size never changes (no SIGBUS under the worker's arrays)."""
    st = _sealed(fd, (ARENA_SEALS, MEMFD_SEALS), "input arena")
    if st.st_size < length:
        raise ProtocolError(f"the attached input arena holds {st.st_size} bytes, its input {length}")
    return _map_read_only(fd, length)


def _write_from_start(fd: int, views: list) -> None:
    """The worker's side of an output or response arena (a memfd whose size no one can change): the
    byte views one after the other from its start (lseek and write: the worker's seccomp filter has no
    pwrite). The caller has checked that they fit."""
    os.lseek(fd, 0, os.SEEK_SET)
    for view in views:
        while view:
            view = view[os.write(fd, view):]


def fill_output_arena(fd: int, data) -> int:
    """Write one output's bytes into its output arena if they fit; return how many bytes it has."""
    view = memoryview(data).cast("B")
    if len(view) <= os.fstat(fd).st_size:
        _write_from_start(fd, [view])
    return len(view)


def fill_response_arena(fd: int, parts) -> int:
    """Write a response body (its parts) into the call's response arena if it is longer than INLINE_MAX
    and fits with RESPONSE_TAIL_ROOM to spare: its length if it is there, else 0 (it then travels in the
    record)."""
    views = [memoryview(p).cast("B") for p in parts]
    n = sum(len(v) for v in views)
    if n <= INLINE_MAX or n + RESPONSE_TAIL_ROOM > os.fstat(fd).st_size:
        return 0
    _write_from_start(fd, views)
    return n


def release(body) -> None:
    """Unmap a memfd body, or close whatever else holds one (the supervisor's response-arena bodies give
    their arena back); inline bodies need nothing. While arrays still view a mapping (a batch's inputs,
    say) it cannot be closed yet: it is then unmapped when the last of them is freed."""
    close = getattr(body, "close", None)   # (bytes have none)
    if close is not None:
        try:
            close()
        except BufferError:
            pass


def connect(path: str, blocking: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(blocking)
    return sock


def listen(path: str, backlog: int = 4) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.bind(path)
    sock.listen(backlog)
    return sock


MAX_LOAD_FDS = 64   # a model's files handed to a warm-pool worker in one LOAD (the signed file set)


def send_load(sock: socket.socket, handoff: bytes, fds: list[int]) -> None:
    """Hand a warm-pool worker its model: the handoff (JSON) and the sealed memfds, in one record."""
    if len(handoff) > INLINE_MAX or len(fds) > MAX_LOAD_FDS:
        raise ValueError(f"a LOAD carries at most {INLINE_MAX} bytes and {MAX_LOAD_FDS} descriptors")
    sock.sendmsg([header(LOAD, 0, len(handoff)), handoff],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


def recv_load(sock: socket.socket) -> tuple[bytes, list[int]]:
    """(handoff JSON, fds) of one LOAD record; each fd a sealed memfd, owned by the caller. Anything
    else is a ProtocolError (Closed at end of stream), with every received descriptor closed."""
    data, ancdata, msg_flags, _ = sock.recvmsg(HEADER.size + INLINE_MAX, socket.CMSG_SPACE(4 * (MAX_LOAD_FDS + 1)))
    fds = _fds(ancdata)
    try:
        if not data and not fds:
            raise Closed("connection closed by the peer")
        if msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) > MAX_LOAD_FDS:
            raise ProtocolError(f"a LOAD record longer than {INLINE_MAX} bytes or with more than "
                                f"{MAX_LOAD_FDS} descriptors")
        if len(data) < HEADER.size:
            raise ProtocolError(f"record of {len(data)} bytes, shorter than the {HEADER.size}-byte header")
        kind, flags, _code, _call_id, side_len, length = HEADER.unpack_from(data)
        if kind != LOAD or flags or side_len or len(data) != HEADER.size + length:
            raise ProtocolError("expected one LOAD record")
        for fd in fds:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (
                    MEMFD_SEALS and fcntl.fcntl(fd, fcntl.F_GET_SEALS) & MEMFD_SEALS != MEMFD_SEALS):
                raise ProtocolError("a LOAD descriptor is not a sealed memfd")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data[HEADER.size:], fds
