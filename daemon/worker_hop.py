"""The supervisor -> worker hop as seen from the public server's event loop (proto/hop.py).

One SOCK_SEQPACKET connection per worker process, made by the first call on the event loop
thread; a reader (loop.add_reader) dispatches records by call id, sends are non-blocking (a
record that does not fit the socket buffer waits for writability, in order). No thread per
call: a pending call is a future. Several calls may be in flight (pipelining, up to the front
door's per-model gate); the worker takes them strictly in order, so a call counts as taken when
the call before it ended, and its inference timeout runs from then (and again from each of
its streamed responses), never from when it was sent.

This is the one seam the supervisor and the server use:
  `await hop.infer(request_bytes, timeout)`      -> the worker's response body
  `hop.stream(request_bytes, timeout)`           -> async iterator of (response body, final)
A response body is bytes, a read-only mmap of the worker's sealed memfd for a large one, or an
ArenaBody (in the call's response arena, which the worker can still write): the caller copies it with
`copy_out(body, tail)`, then checks the copy, and calls proto.hop.release(body).
  `hop.close_soon()`                             (any thread, idempotent)
Failures: WorkerStatus (the worker's ERROR record: a gRPC code and its text), HopTimeout (the
supervisor then kills the worker), HopClosed (the connection ended: the worker died or was
stopped; every pending call fails with it), StreamBacklog (a stream's client fell
MAX_STREAM_BACKLOG responses behind: the call is cancelled). Supervisor.infer turns each into a
client error.
Describe at load is `describe()`, a plain blocking exchange on a connection of its own.
"""
from __future__ import annotations

import asyncio
import collections
import os
import socket
import time

from ..proto import hop
from .shared_memory import ARENA_IDLE_S, Arenas

# Above this, copying the request into its arena (and joining a response out of a memfd) runs on a
# thread, not on the event loop: 64 MiB takes ~10-20 ms to copy.
OFFLOAD_BYTES = 1 << 20
# Responses of one stream received from the worker and not yet taken by its client. Each holds root
# memory (an inline body, up to 64 KiB) or two descriptors and a mapping (a memfd body): past this the
# call is cancelled, so neither a client that stops reading nor a worker that floods can pile them up.
MAX_STREAM_BACKLOG = 64


class HopError(Exception):
    pass


class HopClosed(HopError, ConnectionError):
    """The connection to the worker ended (it died, was stopped, or broke the protocol)."""


class HopTimeout(HopError):
    """The worker took longer than the inference timeout on one call (counted from its take)."""


class StreamBacklog(HopError):
    """A stream's client fell MAX_STREAM_BACKLOG responses behind; the call was cancelled."""


class WorkerStatus(HopError):
    """The worker ended a call with an ERROR record: `code` is a gRPC status code number."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _Call:
    __slots__ = ("id", "stream", "timeout", "items", "waiter", "timer", "ended", "cancelled", "loop", "outputs",
                 "body_arena", "response_arena")

    def __init__(self, call_id: int, stream: bool, timeout: float, loop, outputs: int = 0):
        self.id, self.stream, self.timeout, self.loop = call_id, stream, timeout, loop
        self.outputs = outputs   # shared-memory output arenas sent with it: its final RESPONSE gives their sizes
        self.body_arena = None   # the input arena holding its request's bytes (a large request), until it ends
        self.response_arena = None   # an output arena for its response body (a large unary request), until
        # it ends or its body, written there, is released
        self.items: collections.deque = collections.deque()   # (body, final, output sizes) or an exception
        self.waiter = None
        self.timer = None
        self.ended = loop.create_future()   # set once the call's terminal record (or failure) arrived
        self.cancelled = False

    def push(self, item) -> None:
        if self.cancelled:   # nobody will read it
            if isinstance(item, tuple):
                hop.release(item[0])   # a (body, final, sizes) item: unmap its memfd body, give its arena back
            return
        self.put(item)

    def put(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self):
        while not self.items:
            self.waiter = self.loop.create_future()
            await self.waiter
        item = self.items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item


class ArenaBody:
    """A response body the worker wrote into its call's response arena: its first `length` bytes. Never
    read through the arena's mapping (made with every output arena, left untouched here): a page there can
    be a hole the worker left (reading it through a mapping would allocate it, for the root process) or
    change under a reader. close() (proto.hop.release) gives
    the arena back to its pool, or closes it if the hop has closed meanwhile."""
    __slots__ = ("arena", "length", "_give_back")

    def __init__(self, arena, length: int, give_back):
        self.arena, self.length, self._give_back = arena, length, give_back

    def __len__(self) -> int:
        return self.length

    def read_with(self, tail: bytes) -> bytes:
        """The body with `tail` after it, in one bytes object: the tail is written into the room the
        worker left (hop.RESPONSE_TAIL_ROOM), then both are read with one pread (holes read as zeros,
        allocating nothing). The worker may rewrite either meanwhile: the caller checks the copy."""
        fd, n = self.arena.fd, self.length
        if n + len(tail) > self.arena.capacity:   # a tail longer than the room: two copies
            return os.pread(fd, n, 0) + tail
        os.pwrite(fd, tail, n)
        return os.pread(fd, n + len(tail), 0)

    def close(self) -> None:
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


def copy_out(body, tail: bytes) -> bytes:
    """A response body (bytes, a memfd's mapping, an ArenaBody) with `tail` appended, copied once."""
    if isinstance(body, ArenaBody):
        return body.read_with(tail)
    return b"".join((body, tail))


class WorkerHop:
    def __init__(self, socket_path: str, max_message_bytes: int):
        self.loop = asyncio.get_running_loop()
        self.socket_path, self.max_message_bytes = socket_path, max_message_bytes
        self.sock: socket.socket | None = None
        self.calls: dict[int, _Call] = {}
        self.order: collections.deque[_Call] = collections.deque()   # sent, not ended, in sending order
        self._next_id = 0
        self._unsent: collections.deque = collections.deque()   # records waiting for the socket buffer
        self.closed = False
        self.on_execution = None   # f(rows, ns) per engine call of a batching worker (ModelStatistics)
        # f(reason) when the worker broke the protocol or its socket failed: a worker the supervisor
        # cannot talk to any more is killed (and restarted by its watcher), never left running mute.
        self.on_broken = None
        # This worker's shared-memory arenas (daemon/shared_memory.py), closed with the hop, and when
        # unused for ARENA_IDLE_S (trim_arenas_later).
        self.input_arenas, self.output_arenas = Arenas(), Arenas(outputs=True)
        self._trim_timer = None

    # -- connection ---------------------------------------------------------------------------------
    def _connect(self) -> None:
        if self.closed:
            raise HopClosed("the hop is closed")
        self.sock = hop.connect(self.socket_path, blocking=False)
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def _broken(self, reason: str) -> None:
        self.close(reason)
        if self.on_broken is not None:
            self.on_broken(reason)

    def close(self, reason: str = "the connection to the worker was closed") -> None:
        """Fail every pending call with HopClosed and close the socket (on the loop thread)."""
        self.closed = True
        sock, self.sock = self.sock, None
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            self.loop.remove_writer(sock.fileno())
            sock.close()
        while self._unsent:
            self._unsent.popleft().close()
        calls, self.calls = self.calls, {}
        self.order.clear()
        for call in calls.values():
            self._end(call, HopClosed(reason))
        self.input_arenas.close()   # arenas still in a call's hands are closed when it gives them back
        self.output_arenas.close()
        if self._trim_timer is not None:
            self._trim_timer.cancel()

    def trim_arenas_later(self) -> None:
        """After a shared-memory call (on the loop): close this worker's arenas once unused for
        ARENA_IDLE_S, checking again while some are kept."""
        if self._trim_timer is None and not self.closed:
            self._trim_timer = self.loop.call_later(ARENA_IDLE_S, self._trim_arenas)

    def _trim_arenas(self) -> None:
        self._trim_timer = None
        if self.input_arenas.trim(ARENA_IDLE_S) | self.output_arenas.trim(ARENA_IDLE_S):
            self.trim_arenas_later()

    def close_soon(self) -> None:
        """Close on the hop's own loop; callable from any thread, idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.call_soon_threadsafe(self.close)
        except RuntimeError:   # the loop has ended (daemon shutdown): nothing left to close on
            pass

    # -- sending ------------------------------------------------------------------------------------
    def _send(self, record: hop.Outgoing) -> None:
        if self.sock is None:
            record.close()
            raise HopClosed("the connection to the worker was closed")
        if not self._unsent:
            try:
                record.send_on(self.sock)
                record.close()
                return
            except BlockingIOError:
                self.loop.add_writer(self.sock.fileno(), self._writable)
            except OSError:
                record.close()
                self._broken("the worker's socket failed")
                raise HopClosed("the worker's socket failed") from None
        self._unsent.append(record)

    def _writable(self) -> None:
        try:
            while self._unsent:
                self._unsent[0].send_on(self.sock)
                self._unsent.popleft().close()
            self.loop.remove_writer(self.sock.fileno())
        except BlockingIOError:
            pass
        except OSError:
            self._broken("the worker's socket failed")

    async def _start(self, request, timeout: float, stream: bool, shm_fds=(), side: bytes = b"",
                     outputs: int = 0) -> _Call:
        if self.sock is None:
            self._connect()
        if isinstance(request, list):   # the caller's box: from here only this frame holds the bytes
            request = request.pop()
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        call = _Call(self._next_id, stream, timeout, self.loop, outputs)
        flags = hop.STREAM if stream else 0
        if len(request) > OFFLOAD_BYTES:
            made = self.loop.run_in_executor(None, self._record, call, request, flags, side, shm_fds)
            try:
                # Waited out even if the client goes away meanwhile: the thread copies the request and dups
                # the shared-memory fds, which the caller closes once this returns.
                record = await finished(made)
            except asyncio.CancelledError:   # the client went away meanwhile: the record is never sent
                if not made.cancelled() and made.exception() is None:
                    made.result().close()
                self._arena_back(call, reuse=True)
                raise
            if self.sock is None:   # closed while the request was copied
                record.close()
                self._arena_back(call, reuse=False)
                raise HopClosed("the connection to the worker was closed")
        else:
            record = self._record(call, request, flags, side, shm_fds)
        try:
            self._send(record)
        except HopClosed:
            self._arena_back(call, reuse=False)
            raise
        self.calls[call.id] = call
        self.order.append(call)
        if len(self.order) == 1:
            self._taken(call)
        return call

    def _record(self, call: _Call, request, flags: int, side: bytes, shm_fds) -> hop.Outgoing:
        """The INFER record of `call`. A large request's bytes go into one of this worker's input arenas
        (reused call after call: a fresh memfd's page allocation cost more than the copy itself); the
        arena stays the call's until it ends (_arena_back). A large unary request without shared-memory
        tensors also gets a response arena (an output arena), as large as the request and INLINE_MAX more:
        a large request often has a response of about its size (an echo, an image to an image)."""
        if len(request) <= hop.INLINE_MAX:
            return hop.Outgoing(hop.INFER, call.id, [request], flags, side=side, shm_fds=shm_fds)
        arena = self.input_arenas.take(len(request))
        try:
            if not call.stream and not shm_fds:
                call.response_arena = self.output_arenas.take(len(request) + hop.INLINE_MAX,
                                                              most=self.max_message_bytes)
                shm_fds, side = [call.response_arena.fd], hop.SHM_SIZE.pack(hop.RESPONSE_ARENA)
            arena.mapping[:len(request)] = request
            record = hop.Outgoing(hop.INFER, call.id, flags=flags, side=side, shm_fds=shm_fds,
                                  body_arena=(arena.fd, len(request)))
        except BaseException:
            self.input_arenas.give(arena)
            if call.response_arena is not None:
                self.output_arenas.give(call.response_arena)
                call.response_arena = None
            raise
        call.body_arena = arena
        return record

    def _arena_back(self, call: _Call, reuse: bool) -> None:
        """The call's request arena (and its response arena, unless its body went there) go back to their
        pools when the worker is done with them (the call was never sent, or the worker ended it), and are
        closed otherwise (a timed-out or broken call: the worker may still be reading or writing them)."""
        for arena, pool in ((call.body_arena, self.input_arenas), (call.response_arena, self.output_arenas)):
            if arena is None:
                continue
            if reuse:
                pool.give(arena)
                self.trim_arenas_later()
            else:
                arena.close()
        call.body_arena = call.response_arena = None

    def _arena_body(self, call: _Call, length: int) -> ArenaBody:
        """The body the worker wrote into the call's response arena; the arena is the body's from now on."""
        arena, call.response_arena = call.response_arena, None

        def give_back() -> None:
            self.output_arenas.give(arena)
            self.loop.call_soon_threadsafe(self.trim_arenas_later)   # released on any thread
        return ArenaBody(arena, length, give_back)

    def _cancel(self, call: _Call) -> None:
        """The client went away: tell the worker (it drops the call, or its engine stops iterating)."""
        call.cancelled = True
        while call.items:
            item = call.items.popleft()
            if isinstance(item, tuple):
                hop.release(item[0])   # a (body, final, sizes) item: unmap its memfd body, give its arena back
        if not call.ended.done() and self.sock is not None:
            try:
                self._send(hop.Outgoing(hop.CANCEL, call.id))
            except HopClosed:
                pass

    # -- receiving ----------------------------------------------------------------------------------
    def _readable(self) -> None:
        """One record per wakeup: the reader is level-triggered, so the loop calls again while more
        are waiting, and a lone answer costs one recvmsg (reading on to EAGAIN cost a second)."""
        if self.sock is None:
            return
        try:
            record = hop.recv(self.sock, self.max_message_bytes, hop.TO_SUPERVISOR)
        except BlockingIOError:
            return
        except hop.Closed:
            self._broken("the worker closed its connection")
            return
        except hop.ProtocolError as exc:
            self._broken(f"the worker broke the hop protocol: {exc}")
            return
        except OSError:
            self._broken("the worker's socket failed")
            return
        call = self.calls.get(record.call_id)
        # A call with output arenas (a response arena counts) ends with a final RESPONSE flagged SHM giving
        # their sizes; no other does.
        arenas = call.outputs + (call.response_arena is not None) if call is not None else 0
        sizes_end = hop.SHM_SIZE.size * arenas
        with_sizes = arenas > 0 and record.kind == hop.RESPONSE and record.final
        if call is None or record.kind == hop.DESCRIBE_REPLY or (
                record.kind == hop.RESPONSE and not record.final and not call.stream) or (
                bool(record.flags & hop.SHM) != with_sizes) or (with_sizes and len(record.side) < sizes_end):
            record.release()
            self._broken("the worker broke the hop protocol: an unexpected record")
            return
        if record.kind == hop.ERROR:
            message = bytes(record.body[:hop.MAX_ERROR_BYTES]).decode("utf-8", "replace")
            record.release()
            self._end(call, WorkerStatus(record.code, message))
        elif record.final:
            sizes = [hop.SHM_SIZE.unpack_from(record.side, i)[0] for i in range(0, sizes_end, hop.SHM_SIZE.size)]
            body = record.body
            in_arena = sizes.pop() if call.response_arena is not None else 0
            if in_arena:
                if len(body) or in_arena > call.response_arena.capacity - hop.RESPONSE_TAIL_ROOM:
                    record.release()
                    self._broken("the worker broke the hop protocol: a response both in its arena and in the "
                                 "record, or longer than its arena leaves room for")
                    return
                body = self._arena_body(call, in_arena)
            if len(record.side) > sizes_end and self.on_execution is not None:
                self._execution(record.side[sizes_end:])
            call.push((body, True, sizes))
            self._end(call, None)
        elif len(call.items) >= MAX_STREAM_BACKLOG:
            record.release()
            self._cancel(call)   # lets go of what it holds; the worker's later records are dropped as they come
            call.put(StreamBacklog(f"the client fell {MAX_STREAM_BACKLOG} responses behind"))
        else:
            call.push((record.body, False, ()))
            if not call.cancelled:   # a streamed response: the timeout starts afresh (not for an abandoned call)
                self._taken(call)

    def _execution(self, side: bytes) -> None:
        """A batching worker's account of the engine call that answered (statistics only: a worker
        could lie about it, never about anything else)."""
        if len(side) == hop.EXECUTION.size:
            rows, index, ns = hop.EXECUTION.unpack(side)
            if index == 0:
                self.on_execution(rows, ns)

    def _taken(self, call: _Call) -> None:
        if call.timer is not None:
            call.timer.cancel()
        call.timer = self.loop.call_later(call.timeout, self._expire, call)

    def _expire(self, call: _Call) -> None:
        if call.cancelled:   # nobody waits for its HopTimeout to kill the worker: do it here
            self._broken(f"an abandoned call was not ended within {call.timeout:g} s")
            return
        self._end(call, HopTimeout(f"no answer within {call.timeout:g} s"))

    def _end(self, call: _Call, failure: BaseException | None) -> None:
        """The call's terminal record (or its failure): the next call in order is now taken."""
        if call.ended.done():
            return
        if call.timer is not None:
            call.timer.cancel()
        self.calls.pop(call.id, None)
        was_first = bool(self.order) and self.order[0] is call
        try:
            self.order.remove(call)
        except ValueError:
            pass
        self._arena_back(call, reuse=failure is None or isinstance(failure, WorkerStatus))
        if failure is not None:
            call.push(failure)
        call.ended.set_result(None)
        if was_first and self.order:
            self._taken(self.order[0])

    # -- the seam -----------------------------------------------------------------------------------
    async def infer(self, request, timeout: float):
        """The worker's one response body to a ModelInfer request (bytes, or a one-element list holding
        them, emptied once they are sent)."""
        return (await self.infer_shared(request, timeout))[0]

    async def infer_shared(self, request, timeout: float, arena_fds=(), arena_sizes=()):
        """infer() for a request naming shared-memory tensors: this worker's arenas go with it
        (`arena_fds` and their SHM_SIZE entries `arena_sizes`, shared_memory.SharedCall); returns (body,
        the byte size of each output the worker wrote into its arena), the caller releases the body."""
        side = b"".join(hop.SHM_SIZE.pack(size) for size in arena_sizes)
        outputs = sum(size == hop.OUTPUT_ARENA for size in arena_sizes)
        call = await self._start(request, timeout, stream=False, shm_fds=arena_fds, side=side, outputs=outputs)
        del request
        try:
            body, _final, sizes = await call.next()
        except asyncio.CancelledError:
            await self._abandon(call)
            raise
        return body, sizes

    async def stream(self, request: bytes, timeout: float):
        """(response, final) pairs of a ModelStreamInfer request; the last has final=True."""
        call = await self._start(request, timeout, stream=True)
        try:
            while True:
                body, final, _sizes = await call.next()
                yield body, final
                if final:
                    return
        except (asyncio.CancelledError, GeneratorExit):   # the client went away, or stopped reading
            await self._abandon(call)
            raise
        except StreamBacklog:   # cancelled already: the turn is given back once the worker has ended it
            await finished(call.ended)
            raise

    async def _abandon(self, call: _Call) -> None:
        """The client went away: CANCEL, then wait for the worker's terminal record (through any further
        cancellation), so the call's turn is only given back once the worker is done with it."""
        self._cancel(call)
        await finished(call.ended)


async def finished(future: asyncio.Future):
    """The result of `future` (an executor job, a call's end), awaited to its end even if the awaiting
    task is cancelled meanwhile, once or more: what runs there may use buffers or a turn that the caller
    gives back afterwards. A cancellation that came meanwhile is raised once the future is done."""
    interrupted = None
    while not future.done():
        try:
            await asyncio.wait([future])   # never cancels `future` itself
        except asyncio.CancelledError as exc:
            interrupted = exc
    if interrupted is None:
        return future.result()
    if not future.cancelled():
        future.exception()   # retrieved: its failure is superseded by the cancellation
    try:
        raise interrupted
    finally:
        interrupted = None   # no exception -> traceback -> frame -> exception cycle


def describe(socket_path: str, max_bytes: int, timeout: float) -> bytes:
    """The worker's DESCRIBE_REPLY body: its serialized ModelMetadataResponse. Blocking (the load runs
    on a thread). Raises OSError while the worker is not listening yet (the caller retries),
    hop.ProtocolError for a malformed or oversized answer, TimeoutError."""
    sock = hop.connect(socket_path)
    try:
        sock.settimeout(timeout)
        hop.send(sock, hop.DESCRIBE, 1)
        deadline = time.monotonic() + timeout
        while True:
            record = hop.recv(sock, max_bytes, hop.TO_SUPERVISOR)
            if record.kind == hop.DESCRIBE_REPLY and record.call_id == 1:
                body = bytes(record.body)
                hop.release(record.body)
                return body
            hop.release(record.body)
            if record.kind != hop.DESCRIBE_REPLY or time.monotonic() > deadline:
                raise hop.ProtocolError("unexpected answer to DESCRIBE")
    finally:
        sock.close()
