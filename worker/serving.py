"""The worker's side of the hop (proto/hop.py): no gRPC, one engine thread, calls in order.

A reader thread per connection receives records: DESCRIBE is answered at once (the answer is made
once, at load), INFER is queued for the engine thread with a per-call cancellation event, CANCEL
sets that event. The engine thread (the one that loaded the model: MLX streams are per thread)
takes calls strictly in arrival order, so the supervisor knows when each call is taken (when the
previous one ended) and can count the inference timeout from there. Every INFER ends with exactly
one terminal record: RESPONSE with FINAL, or ERROR (CANCELLED for a dropped call).

Through ModelStreamInfer, an engine that overrides `Engine.responses` is decoupled (Triton's word):
each response it yields leaves at once as a RESPONSE record, and a FINAL RESPONSE with an empty body
ends the call, so the first response never waits for the second. Every other call (ModelInfer, or an
engine with the default one-response `responses`) is answered by exactly one RESPONSE, flagged FINAL.
"""
from __future__ import annotations

import collections
import mmap
import queue
import resource
import socket
import sys
import threading
import time
from typing import NamedTuple

from . import batching
from ..proto import hop
from ..proto import inference_pb2 as pb
from ..proto.contract import STDERR_PREFIX
from ..proto import tensors, wire
from .engine import Engine, InferenceError, InputError

MAX_CONNECTIONS = 4        # the supervisor uses one (plus one for Describe at load)
MAX_QUEUED = hop.MAX_QUEUED_CALLS   # calls a worker holds; the supervisor keeps at most half that many in flight
# Descriptors: each queued call holds some (its memfd body's mapping, its shared-memory input mappings
# and output arenas; Python's mmap keeps a duplicate of what it maps) until it is done. The reader reads
# the next record only while that leaves room for the largest record being received and decoded
# (RECORD_FDS) and FD_RESERVE for the worker's own files, so pipelined calls never exhaust RLIMIT_NOFILE.
FD_RESERVE = 32
RECORD_FDS = 2 * (hop.MAX_FDS + 1)   # received, plus the duplicates decoding makes


class Connection:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.send_lock = threading.Lock()   # the reader (Describe) and the engine thread both send
        self.calls: dict[int, threading.Event] = {}   # call id -> cancelled, while queued or running
        self.open = True

    def send(self, kind: int, call_id: int, parts=(), flags: int = 0, code: int = 0, side: bytes = b"") -> None:
        with self.send_lock:
            if self.open:
                try:
                    hop.send(self.sock, kind, call_id, parts, flags, code, side)
                except OSError:   # the supervisor went away: its calls are dropped as they come up
                    self.close()

    def error(self, call_id: int, code: int, message: str) -> None:
        self.send(hop.ERROR, call_id, [message.encode("utf-8", "replace")[:hop.MAX_ERROR_BYTES]], code=code)

    def close(self) -> None:
        self.open = False
        for event in list(self.calls.values()):
            event.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _fds_held(record: hop.Record) -> int:
    """Descriptors a received record keeps until it is released."""
    return (isinstance(record.body, mmap.mmap) + sum(isinstance(v, mmap.mmap) for v in record.shm)
            + len(record.outputs) + (record.response_arena is not None))


class _Call(NamedTuple):
    item: tuple          # (connection, record, cancelled)
    request: object      # the parsed ModelInferRequest
    inputs: dict
    wanted: list
    streaming: bool
    key: object          # batching.batch_key: None when it runs alone
    rows: int


class WorkerServer:
    """Serves one loaded engine over hop connections. `run_engine` must run on the engine's thread.
    With `batching` (contract.Batching), calls that fit are run together (worker/batching.py)."""

    def __init__(self, engine, max_message_bytes: int, describe: bytes, batching_config=None):
        self.engine, self.max_message_bytes, self.describe = engine, max_message_bytes, describe
        self.batching = batching_config
        self.batching_max = batching_config.max_batch_size if batching_config else 0
        self.batch_sizes: collections.Counter = collections.Counter()   # rows per engine call (batches)
        self._held: collections.deque = collections.deque()   # (item, prepared call) taken but not fitting
        self.calls: queue.Queue = queue.Queue()
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._queued = threading.BoundedSemaphore(MAX_QUEUED)
        # Room for the descriptors queued calls hold (see FD_RESERVE), from the worker's own limit.
        self.fd_room = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE - RECORD_FDS
        self._held_fds = 0
        self._fds_freed = threading.Condition()

    # -- reading (one thread per connection) --------------------------------------------------------
    def accept_forever(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                if listener.fileno() == -1:   # the listener was closed: serving is over
                    return
                raise
            if not self._connections.acquire(blocking=False):
                sock.close()   # beyond MAX_CONNECTIONS: refused
                continue
            threading.Thread(target=self.serve_connection, args=(sock,), daemon=True, name="hop-reader").start()

    def serve_connection(self, sock: socket.socket, release: bool = True) -> None:
        conn = Connection(sock)
        try:
            while True:
                with self._fds_freed:   # wait until the calls the engine finishes leave room
                    self._fds_freed.wait_for(lambda: self._held_fds <= self.fd_room)
                record = hop.recv(sock, self.max_message_bytes, hop.TO_WORKER)
                if record.kind == hop.DESCRIBE:
                    conn.send(hop.DESCRIBE_REPLY, record.call_id, [self.describe])
                elif record.kind == hop.INFER:
                    if record.call_id in conn.calls or not self._queued.acquire(blocking=False):
                        record.release()
                        raise hop.ProtocolError("a call id already in flight, or too many calls queued")
                    cancelled = conn.calls[record.call_id] = threading.Event()
                    with self._fds_freed:
                        self._held_fds += _fds_held(record)
                    self.calls.put((conn, record, cancelled))
                else:   # CANCEL: dropped if still queued, else the engine's iterator sees it
                    event = conn.calls.get(record.call_id)
                    if event is not None:
                        event.set()
        except hop.Closed:
            pass
        except hop.ProtocolError as exc:
            print(f"{STDERR_PREFIX}hop: {exc}; connection closed", file=sys.stderr, flush=True)
        except OSError:
            pass
        finally:
            conn.close()
            sock.close()
            if release:
                self._connections.release()

    # -- the engine thread --------------------------------------------------------------------------
    def run_engine(self) -> None:
        while True:
            item, call = self._held.popleft() if self._held else (self.calls.get(), None)
            if item is None:
                return
            taken, batch = [item], None   # every item taken here ends exactly once, below
            try:
                call = call or self._prepare(item)
                if call is None:   # answered with an error already
                    continue
                if self.batching is None or call.key is None:
                    self._run_alone(call)
                    continue
                batch = self._gather(call, taken)
                if len(batch) == 1:
                    self._run_alone(call)
                else:
                    self._run_batch(batch)
            finally:
                # The calls' input arrays may view their records' mappings (a large body's raw inputs,
                # shared-memory inputs): dropped first, so that release() unmaps them now, not when the
                # next call comes.
                call = batch = None
                for conn, record, _cancelled in taken:
                    held = _fds_held(record)
                    record.release()
                    conn.calls.pop(record.call_id, None)
                    self._queued.release()
                    with self._fds_freed:
                        self._held_fds -= held
                        self._fds_freed.notify_all()

    def stop(self) -> None:
        self.calls.put(None)

    def _prepare(self, item) -> "_Call | None":
        """Parse and check one call; None once it has been answered (cancelled, or an error)."""
        conn, record, cancelled = item
        if cancelled.is_set():
            conn.error(record.call_id, hop.CANCELLED, "cancelled")
            return None
        raw = None
        try:
            if record.flags & hop.MEMFD:   # a large body: its raw inputs stay in the mapping (no copies)
                rest, raw = wire.split_raw_inputs(record.body)
                request = pb.ModelInferRequest.FromString(rest)
            else:
                request = pb.ModelInferRequest.FromString(record.body)
        except Exception as exc:   # protobuf's DecodeError or wire.PeekError: the client's error, not INTERNAL
            conn.error(record.call_id, hop.INVALID_ARGUMENT, f"malformed ModelInferRequest: {exc}")
            return None
        try:
            inputs = tensors.request_inputs(request, record.shm, raw)
            self.engine.check_inputs(inputs)
            wanted = self._outputs(request)
        except (InputError, tensors.TensorError) as exc:
            conn.error(record.call_id, hop.INVALID_ARGUMENT, str(exc))
            return None
        streaming = bool(record.flags & hop.STREAM)
        # A call with shared-memory outputs runs alone: its outputs go into its own output arenas.
        alone = streaming or any(tensors.SHM_REGION in o.parameters for o in request.outputs)
        key, rows = batching.batch_key(inputs) if self.batching is not None and not alone else (None, 0)
        if rows > self.batching_max:   # as Triton: a request's batch is at most max_batch_size
            conn.error(record.call_id, hop.INVALID_ARGUMENT,
                       f"a batch of {rows} rows is more than the model's max_batch_size {self.batching_max}")
            return None
        return _Call(item, request, inputs, wanted, streaming, key, rows)

    def _gather(self, first: "_Call", taken: list) -> list:
        """`first` and the calls queued behind it that fit the same engine call, waiting at most
        max_queue_delay_us for more; stops at max_batch_size rows, at a preferred size, or at the
        first call that does not fit (held for the next turn, so calls keep their order)."""
        b = self.batching
        batch, rows = [first], first.rows
        deadline = time.monotonic() + b.max_queue_delay_us / 1e6
        while rows < b.max_batch_size and rows not in b.preferred_batch_sizes:
            wait = deadline - time.monotonic()
            try:
                item = self.calls.get(timeout=wait) if wait > 0 else self.calls.get_nowait()
            except queue.Empty:
                break
            if item is None:   # stopping: after this batch
                self._held.append((None, None))
                break
            call = self._prepare(item)
            if call is None:
                taken.append(item)
                continue
            if call.key != first.key or rows + call.rows > b.max_batch_size:
                self._held.append((item, call))
                break
            taken.append(item)
            batch.append(call)
            rows += call.rows
        return batch

    def _run_batch(self, batch: list) -> None:
        """One engine call for the whole batch; each member gets its own rows, or the same error."""
        live = []
        for call in batch:
            conn, record, cancelled = call.item
            if cancelled.is_set():
                conn.error(record.call_id, hop.CANCELLED, "cancelled")
            else:
                live.append(call)
        if not live:
            return
        rows = sum(c.rows for c in live)
        self.batch_sizes[rows] += 1
        started = time.perf_counter_ns()
        try:
            results = self.engine.responses(batching.join([c.inputs for c in live]), streaming=False,
                                            cancelled=threading.Event())
            try:
                result = next(iter(results))
            finally:
                close = getattr(results, "close", None)
                if close is not None:
                    close()
            parts = batching.split(dict(result), [c.rows for c in live])
            answers = [self._encode(c.request, part, c.wanted) for c, part in zip(live, parts)]
        except StopIteration:
            return self._fail_all(live, hop.INTERNAL, "the engine gave no response")
        except InferenceError as exc:
            return self._fail_all(live, hop.INTERNAL, str(exc))
        except Exception as exc:   # an engine bug: one clean line
            return self._fail_all(live, hop.INTERNAL, f"inference failed: {type(exc).__name__}: {exc}")
        spent = time.perf_counter_ns() - started
        for index, (call, answer) in enumerate(zip(live, answers)):
            conn, record, _cancelled = call.item
            self._final(conn, record, answer, execution=hop.EXECUTION.pack(rows, index, spent))

    @staticmethod
    def _fail_all(calls: list, code: int, message: str) -> None:
        for call in calls:
            conn, record, _cancelled = call.item
            conn.error(record.call_id, code, message)

    def _run_alone(self, call: "_Call") -> None:
        (conn, record, cancelled), request = call.item, call.request
        streaming = call.streaming
        started = time.perf_counter_ns()
        try:
            to_shm = [o.name for o in request.outputs if tensors.SHM_REGION in o.parameters]
            results = self.engine.responses(call.inputs, streaming=streaming, cancelled=cancelled)
            try:
                decoupled = streaming and type(self.engine).responses is not Engine.responses
                if to_shm and decoupled:
                    raise InputError("shared-memory outputs are not served on a decoupled stream")
                if decoupled:
                    # A decoupled engine: each response leaves as soon as it is made, the end follows
                    # as a FINAL record of its own (empty body), as Triton's decoupled models do.
                    for result in results:
                        if cancelled.is_set():
                            break
                        conn.send(hop.RESPONSE, record.call_id, self._encode(request, result, call.wanted))
                    last = []
                else:   # exactly one response, sent FINAL
                    last = None
                    for result in results:
                        if cancelled.is_set():
                            break
                        if last is not None:
                            raise InferenceError("the engine answered a unary call more than once")
                        last = self._encode(request, result, call.wanted, to_shm)
                        last_results = result
            finally:
                close = getattr(results, "close", None)
                if close is not None:
                    close()
            if cancelled.is_set():
                conn.error(record.call_id, hop.CANCELLED, "cancelled")
                return
            if last is None:
                raise InferenceError("the engine gave no response")
        except (InputError, tensors.TensorError) as exc:
            conn.error(record.call_id, hop.INVALID_ARGUMENT, str(exc))
            return
        except InferenceError as exc:
            conn.error(record.call_id, hop.INTERNAL, str(exc))
            return
        except Exception as exc:   # an engine bug: one clean line
            conn.error(record.call_id, hop.INTERNAL, f"inference failed: {type(exc).__name__}: {exc}")
            return
        sizes, flags = b"", hop.FINAL
        if to_shm:
            # Outputs named in a shared-memory region go into the supervisor's output arenas sent with the
            # call, in request order; the side data says how many bytes each has (the supervisor copies
            # them into the client's region, which the worker never sees).
            if len(record.outputs) != len(to_shm):
                conn.error(record.call_id, hop.INTERNAL, "the call's shared-memory output arenas are missing")
                return
            try:
                sizes = b"".join(hop.SHM_SIZE.pack(hop.fill_output_arena(fd, tensors.raw_bytes(last_results[name])))
                                 for name, fd in zip(to_shm, record.outputs))
            except (OSError, tensors.TensorError) as exc:
                conn.error(record.call_id, hop.INTERNAL, f"writing a shared-memory output failed: {exc}")
                return
            flags |= hop.SHM
        execution = b""
        if self.batching is not None and call.rows and not streaming:   # an execution of one request
            self.batch_sizes[call.rows] += 1
            execution = hop.EXECUTION.pack(call.rows, 0, time.perf_counter_ns() - started)
        self._final(conn, record, last, flags, sizes, execution)

    @staticmethod
    def _final(conn: Connection, record: hop.Record, parts: list, flags: int = hop.FINAL, sizes: bytes = b"",
               execution: bytes = b"") -> None:
        """A call's final RESPONSE: side data = the output arenas' sizes, the response arena's (if the call
        came with one: the body is written there when it is large and fits, and the record then carries
        none), then the batch's EXECUTION."""
        if record.response_arena is not None:
            try:
                in_arena = hop.fill_response_arena(record.response_arena, parts)
            except OSError as exc:
                conn.error(record.call_id, hop.INTERNAL, f"writing the response failed: {exc}")
                return
            sizes += hop.SHM_SIZE.pack(in_arena)
            flags |= hop.SHM
            if in_arena:
                parts = ()
        conn.send(hop.RESPONSE, record.call_id, parts, flags=flags, side=sizes + execution)

    def _outputs(self, request) -> list[str]:
        known = [o.name for o in self.engine.outputs]
        wanted = [o.name for o in request.outputs]
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise InputError(f"requested outputs {unknown} do not exist (outputs: {known})")
        return wanted or list(self.engine.default_outputs or known)

    @staticmethod
    def _encode(request, result: dict, wanted: list[str], to_shm=()) -> list:
        missing = [name for name in wanted if name not in result]
        if missing:
            raise InferenceError(f"the engine's response lacks outputs {missing}")
        response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                         id=request.id)
        return tensors.response_parts(response, {name: result[name] for name in wanted}, set(to_shm))


def describe_answer(engine, phases: dict[str, float]) -> bytes:
    """The serialized ModelMetadataResponse, with the load phases (seconds) as double parameters."""
    response = pb.ModelMetadataResponse(platform=engine.platform)
    for spec_list, field in ((engine.inputs, response.inputs), (engine.outputs, response.outputs)):
        for t in spec_list:
            field.add(name=t.name, datatype=t.datatype, shape=t.shape)
    for key, seconds in phases.items():
        response.parameters[key].double_param = seconds
    return response.SerializeToString()


def serve(engine, socket_path: str, max_message_bytes: int, phases: dict[str, float], on_engine_thread,
          stopped: threading.Event, batching_config=None, listener=None) -> None:
    """Listen on socket_path (or serve `listener`: a warm-pool worker's), run calls on the engine's
    thread (`on_engine_thread(fn)` submits fn there), until `stopped` is set."""
    server = WorkerServer(engine, max_message_bytes, describe_answer(engine, phases), batching_config)
    listener = listener or hop.listen(socket_path)
    threading.Thread(target=server.accept_forever, args=(listener,), daemon=True, name="hop-accept").start()
    done = on_engine_thread(server.run_engine)
    while not stopped.wait(1.0):   # polled: the signal may land on another thread (OpenBLAS's)
        pass
    server.stop()
    deadline = time.monotonic() + 1.0
    while not done.done() and time.monotonic() < deadline:
        time.sleep(0.01)
