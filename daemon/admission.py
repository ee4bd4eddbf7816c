"""Admission control for the public server (grpc.aio): bounded cost per caller, per model, in total.

Everything here runs on the event loop thread: plain ints are enough (no locks), and every
refusal is immediate (RESOURCE_EXHAUSTED) except the per-model queue, which waits at most
until the caller's deadline / the model's queue timeout.

Lanes
  control lane   health, metadata, model-repository, statistics RPCs: own cap (`control_rpcs`),
                 never counted against inference, so they never wait behind it.
  inference lane ModelInfer / ModelStreamInfer:
    1. before the request message is read: global cap of inference RPCs (`inference_rpcs`),
       separate cap of open streams (`streams`), per-caller cap (`per_caller_rpcs`).
       ModelInfer is registered as a stream_unary handler (see server.py) so that this
       check runs BEFORE gRPC reads the (up to max_receive_message_length) message:
       refused calls never have their body read.  Peak request memory is therefore bounded by
       (inference_rpcs + streams) x max_receive_message_length + HTTP/2 windows.
    2. after reading: the actual bytes against `inflight_bytes` (global) and the model's
       `model_bytes`; these bytes stay reserved until the response is sent.
    3. per model: `model_concurrency` calls at each of its workers (instances) (config `model_inflight`, default 2:
       pipelined over the hop, the worker's one engine thread runs them in order) and a bounded
       FIFO queue of `model_queue` waiters; a full queue refuses immediately, so a hung model
       holds at most model_concurrency + model_queue inference slots. A ModelStreamInfer request
       answered with several responses holds one turn for all of them.
  streams        ModelStreamInfer: idle timeout between messages (`stream_idle_s`); an idle
                 stream costs a coroutine and an HTTP/2 stream, no thread.
  unary requests every other method's one request message (health, metadata, the repository, the
                 shared-memory RPCs: a few hundred bytes each) is read only after the role check,
                 at most UNARY_READS at once per caller with at most UNARY_WAITERS more of that
                 caller's waiting (beyond: refused at once), and refused above
                 MAX_UNARY_REQUEST_BYTES (`read_unary`); the control lane is entered after it. gRPC
                 takes a message up to the message limit once it is read, so without this every
                 control call could make the root process hold max_message_bytes (measured: 8
                 ServerLive requests of 100 MiB took a plain grpc.aio server +1.75 GiB); a call
                 not yet read costs what HTTP/2 flow control lets in (~5-10 MiB, measured). Per
                 caller, so that a caller who sends slowly, or never, delays only its own requests.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import grpc

from .errors import ClientError, exhausted, unavailable

MiB = 2**20
UNARY_READS = 2                        # unary-request messages of one caller being received at once
UNARY_WAITERS = 8                      # more of its unary requests waiting for one of those reads
MAX_UNARY_REQUEST_BYTES = 1 * MiB      # the largest such message taken


@dataclasses.dataclass(frozen=True)
class Limits:
    # Defaults are the config's ([server.limits], config.py); max_message_bytes is [server] max_message_mb.
    max_message_bytes: int = 256 * MiB
    inference_rpcs: int = 8            # global, pre-read (unary ModelInfer in flight)
    streams: int = 16                  # global open ModelStreamInfer streams
    per_caller_rpcs: int = 32          # per Caller.key, unary + streams
    inflight_bytes: int = 1024 * MiB   # global, post-read, request bytes held
    model_bytes: int = 512 * MiB       # per model, post-read
    model_concurrency: int = 2         # calls at the worker at once (config `model_inflight`; pipelined)
    model_queue: int = 4               # waiters per model beyond that
    model_queue_timeout_s: float = 30.0
    control_rpcs: int = 64             # health/metadata/admin lane
    stream_idle_s: float = 30.0
    read_timeout_s: float = 30.0       # to receive one request message once the RPC is admitted
    max_streams_per_connection: int = 16
    max_connections: int = 256
    extra_options: tuple = ()          # (name, value) pairs appended to server_options()

    def server_options(self) -> list[tuple[str, int]]:
        """grpc.aio.server options (names verified in grpcio 1.85.3's cygrpc)."""
        return [
            ("grpc.so_reuseport", 0),                                   # two daemons on one port: bind fails
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),  # HTTP/2 SETTINGS, per connection
            ("grpc.max_allowed_incoming_connections", self.max_connections),   # per listener (server)
            ("grpc.max_metadata_size", 16 * 1024),                      # request headers
            ("grpc.server_handshake_timeout_ms", 10_000),               # TLS handshake / HTTP/2 preface
            ("grpc.max_connection_idle_ms", 5 * 60_000),                # connections without RPCs
            *self.extra_options,
        ]

    def maximum_concurrent_rpcs(self) -> int:
        """Backstop for grpc.aio.server(maximum_concurrent_rpcs=...): gRPC's own cap is global per server
        and does NOT distinguish methods (health would be refused too), so it sits above our lanes."""
        return self.inference_rpcs + self.streams + self.control_rpcs + 16


class ModelGate:
    """Per-model: `concurrency` at the worker, at most `queue` waiting, FIFO; full -> refuse at once."""

    def __init__(self, name: str, concurrency: int, queue: int, max_bytes: int):
        self.name, self.queue, self.max_bytes, self.concurrency = name, queue, max_bytes, concurrency
        self._sem = asyncio.Semaphore(concurrency)
        self.waiting = 0
        self.bytes = 0

    @contextlib.asynccontextmanager
    async def turn(self, timeout: float):
        if self._sem.locked():                       # no free slot: queue, if there is room
            if self.waiting >= self.queue:
                raise exhausted(f"queued requests for model '{self.name}'")
            self.waiting += 1
            try:
                # Not wait_for: on Python 3.11 it returns a turn granted in the same step as the caller's
                # cancellation, losing the cancellation (a departed client's call would then run).
                # A cancelled acquire() hands a granted turn on.
                async with asyncio.timeout(timeout):
                    await self._sem.acquire()
            except TimeoutError:
                raise unavailable(self.name, f"busy: no turn within {timeout:g} s") from None
            finally:
                self.waiting -= 1
        else:
            await self._sem.acquire()                # returns at once
        try:
            yield
        finally:
            self._sem.release()


class _UnaryReads:
    """One caller's unary-request reads: UNARY_READS turns, and how many of its calls hold or wait for one."""
    __slots__ = ("turns", "calls")

    def __init__(self):
        self.turns, self.calls = asyncio.Semaphore(UNARY_READS), 0


class Admission:
    def __init__(self, limits: Limits):
        self.l = limits
        self.inference = 0
        self.streams = 0
        self.control = 0
        self.bytes = 0
        self.per_caller: dict[str, int] = {}
        self.models: dict[str, ModelGate] = {}
        self.refusals = 0
        self._unary_reads: dict[str, _UnaryReads] = {}   # active callers only

    async def read_unary(self, context, deserializer, caller_key: str):
        """The one request message of a unary-request RPC (listeners._wrap), read while at most
        UNARY_READS others of the same caller are, after at most UNARY_WAITERS of its calls ahead of it;
        ClientError when there is no room, when it does not come within read_timeout_s (waiting
        included), or when it is missing, larger than MAX_UNARY_REQUEST_BYTES or malformed."""
        reads = self._unary_reads.get(caller_key)
        if reads is None:
            reads = self._unary_reads[caller_key] = _UnaryReads()
        if reads.calls >= UNARY_READS + UNARY_WAITERS:
            raise self._refuse("requests being received for this caller")
        reads.calls += 1
        try:
            async with asyncio.timeout(self.l.read_timeout_s):
                async with reads.turns:
                    raw = await context.read()
        except TimeoutError:
            raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no request within {self.l.read_timeout_s:g} s") from None
        finally:
            reads.calls -= 1
            if not reads.calls:
                del self._unary_reads[caller_key]
        if raw is grpc.aio.EOF:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
        if len(raw) > MAX_UNARY_REQUEST_BYTES:
            size = len(raw)
            del raw   # the refusal's traceback keeps this frame, and grpc.aio keeps the abort chained to it
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"a request of {size} bytes: this method "
                                                                f"takes at most {MAX_UNARY_REQUEST_BYTES} bytes")
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception:   # protobuf's DecodeError
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message") from None

    def model(self, name: str, concurrency: int | None = None) -> ModelGate:
        """Gates exist for configured models only (the caller checks the name first), so this dict is bounded.
        `concurrency`: the calls let through to the model's workers at once (default model_concurrency;
        the supervisor scales it by instances and batch size); when it changes (a reload) the model
        gets a new gate and calls holding the old one finish on it."""
        gate = self.models.get(name)
        concurrency = concurrency or self.l.model_concurrency
        if gate is None or gate.concurrency != concurrency:
            gate = self.models[name] = ModelGate(name, concurrency, self.l.model_queue, self.l.model_bytes)
        return gate

    def _refuse(self, what: str) -> ClientError:
        self.refusals += 1
        return exhausted(what)

    @contextlib.contextmanager
    def control_call(self):
        if self.control >= self.l.control_rpcs:
            raise self._refuse("concurrent control calls")
        self.control += 1
        try:
            yield
        finally:
            self.control -= 1

    @contextlib.contextmanager
    def inference_call(self, caller_key: str, stream: bool):
        """Pre-read admission of one ModelInfer RPC or one ModelStreamInfer stream."""
        if stream:
            if self.streams >= self.l.streams:
                raise self._refuse("open inference streams")
        elif self.inference >= self.l.inference_rpcs:
            raise self._refuse("concurrent inference calls")
        mine = self.per_caller.get(caller_key, 0)
        if mine >= self.l.per_caller_rpcs:
            raise self._refuse("concurrent inference calls for this caller")
        self.per_caller[caller_key] = mine + 1
        if stream:
            self.streams += 1
        else:
            self.inference += 1
        try:
            yield
        finally:
            if stream:
                self.streams -= 1
            else:
                self.inference -= 1
            left = self.per_caller[caller_key] - 1
            if left:
                self.per_caller[caller_key] = left
            else:
                del self.per_caller[caller_key]     # the dict holds active callers only

    @contextlib.contextmanager
    def request_bytes(self, gate: ModelGate, n: int):
        """Post-read: reserve n request bytes globally and for the model until the response is sent."""
        if self.bytes + n > self.l.inflight_bytes:
            raise self._refuse("in-flight request bytes")
        if gate.bytes + n > gate.max_bytes:
            raise self._refuse(f"in-flight request bytes for model '{gate.name}'")
        self.bytes += n
        gate.bytes += n
        try:
            yield
        finally:
            self.bytes -= n
            gate.bytes -= n

    def snapshot(self) -> dict:
        return {"inference": self.inference, "streams": self.streams, "control": self.control,
                "bytes": self.bytes, "refusals": self.refusals,
                "models": {n: {"waiting": g.waiting, "bytes": g.bytes} for n, g in self.models.items()}}


async def read_one(context, timeout: float):
    """Read the next request message of a stream handler with a timeout.
    Returns bytes, or None at end of stream (grpc.aio.EOF)."""
    try:
        async with asyncio.timeout(timeout):   # no task per read, unlike wait_for on Python 3.11
            msg = await context.read()
    except TimeoutError:
        raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no request within {timeout:g} s") from None
    return None if msg is grpc.aio.EOF else msg


def tune_malloc(mmap_threshold: int = 64 * 1024) -> bool:
    """Make freed request buffers go back to the OS (glibc only).

    Measured: with glibc's default DYNAMIC mmap threshold, after a few 60 MiB messages freed the
    threshold rises to 32 MiB and gRPC's receive slices + the assembled bytes land in the heap,
    where fragmentation keeps them: a flood with 8 admitted calls peaked at ~1 GiB and stayed at
    ~0.7 GiB afterwards.  A fixed threshold (same as MALLOC_MMAP_THRESHOLD_=65536 in the
    environment) gave peak ~= 8 x 60 MiB and ~30 MiB after.  Call once at daemon start.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        libc.mallopt(M_TRIM_THRESHOLD, 4 * mmap_threshold)
        return ok
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to do
        return False
