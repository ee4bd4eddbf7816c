"""The supervisor <-> worker hop (proto/hop.py) with both real sides in one process: the worker's
loop (worker/serving.py) on a real SOCK_SEQPACKET socket, driven by the supervisor's WorkerHop
(daemon/worker_hop.py) on a real event loop. Test engines live here, not in the product."""
from __future__ import annotations

import array
import asyncio
import fcntl
import mmap
import os
import socket
import struct
import tempfile
import threading
import time

import grpc
import numpy as np
import pytest

from sealbox.daemon.shared_memory import Arenas
from sealbox.daemon.worker_hop import ArenaBody, HopClosed, HopTimeout, WorkerHop, WorkerStatus, copy_out, describe
from sealbox.proto import hop, tensors, wire
from sealbox.proto import inference_pb2 as pb
from sealbox.proto.contract import MEMFD_SEALS
from sealbox.worker.engine import Engine, InputError, TensorSpec
from sealbox.worker.serving import WorkerServer, describe_answer

SPEC = (TensorSpec("x", "FP32", (-1, -1)),)
MAX = 2**28


class Echo(Engine):
    """Returns its input (times `scale`); `calls` records what reached the engine; `gate` (if set)
    holds each call until released; a "steps" input streams that many responses."""
    platform = "test"
    inputs = SPEC
    outputs = (TensorSpec("y", "FP32", (-1, -1)),)

    def __init__(self):
        self.calls = []
        self.gate = None
        self.delays = []
        self.stopped_early = threading.Event()

    @classmethod
    def load(cls, files):
        return cls()

    def infer(self, inputs):
        return {"y": inputs["x"] * 1.0}

    def responses(self, inputs, *, streaming, cancelled):
        x = inputs["x"]
        self.calls.append(float(x.flat[0]) if x.size else None)
        if self.gate is not None:
            self.gate.wait(10)
        if self.delays:
            time.sleep(self.delays.pop(0))
        steps = int(x.shape[0]) if streaming else 1
        for step in range(steps):
            if cancelled.is_set():
                self.stopped_early.set()
                return
            yield {"y": x + step}
            if streaming and x.flat[0] < 0:   # a slow stream: wait for a cancel
                cancelled.wait(10)


class Plain(Echo):
    responses = Engine.responses   # the default: one response from infer()


class Twice(Echo):
    def responses(self, inputs, *, streaming, cancelled):
        yield self.infer(inputs)
        yield self.infer(inputs)


class Picky(Echo):
    responses = Engine.responses   # the default: one response from infer()

    def infer(self, inputs):
        raise InputError("input 'x' is not to my taste; see /etc/shadow")


class Worker:
    """A real worker loop on a real listening socket, in threads of this process."""

    def __init__(self, engine):
        self.engine = engine
        self.dir = tempfile.mkdtemp()
        self.path = f"{self.dir}/worker.sock"
        self.server = WorkerServer(engine, MAX, describe_answer(engine, {"load_s": 0.25}))
        self.listener = hop.listen(self.path)
        threading.Thread(target=self.server.accept_forever, args=(self.listener,), daemon=True).start()
        self.engine_thread = threading.Thread(target=self.server.run_engine, daemon=True)
        self.engine_thread.start()

    def stop(self):
        self.server.stop()
        self.engine_thread.join(10)
        self.listener.close()


@pytest.fixture
def worker():
    made = []

    def make(engine=None):
        w = Worker(engine or Echo())
        made.append(w)
        return w
    yield make
    for w in made:
        w.stop()


def request(x: np.ndarray, **kw) -> bytes:
    return tensors.encode_request("m", {"x": x}, **kw)


def outputs(body) -> dict:
    data = copy_out(body, b"")
    hop.release(body)
    return tensors.response_outputs(pb.ModelInferResponse.FromString(data))


def run(coro):
    return asyncio.run(coro)


def open_fds() -> set[str]:
    """This process's descriptors (without the one listdir itself opened for the listing)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
            found.add(fd)
        except OSError:
            pass
    return found


def no_fd_left(before: set[str]) -> bool:
    """No descriptor beyond `before` (the in-process worker closes its end of a connection a moment
    after the supervisor's end closed: waited for briefly) and no memfd at all."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if open_fds() <= before and not memfds():
            return True
        time.sleep(0.02)
    return False


def memfds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "memfd:" in os.readlink(f"/proc/self/fd/{fd}"):
                found.append(fd)
        except OSError:
            pass
    return found


# ---- exact answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 100, 5000, 2**20])   # 16 B ... 16 MiB: inline and memfd, both ways
def test_exact_outputs_inline_and_memfd(worker, rows):
    w = worker()
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    before = open_fds()

    async def main():
        channel = WorkerHop(w.path, MAX)
        body = await channel.infer(request(x), 10)
        assert isinstance(body, bytes) == (len(body) <= hop.INLINE_MAX)
        got = outputs(body)
        channel.close()
        return got
    got = run(main())
    np.testing.assert_array_equal(got["y"], x)
    assert no_fd_left(before)   # no memfd or socket left behind


def test_describe_over_the_hop(worker):
    w = worker()
    answer = pb.ModelMetadataResponse.FromString(describe(w.path, 2**16, 5))
    assert answer.platform == "test"
    assert [(t.name, t.datatype, list(t.shape)) for t in answer.inputs] == [("x", "FP32", [-1, -1])]
    assert answer.parameters["load_s"].double_param == 0.25


def test_describe_answer_above_the_bound_is_refused(worker):
    w = worker()
    w.server.describe = b"\x0a" + b"x" * 200   # longer than the bound the supervisor passes
    with pytest.raises(hop.ProtocolError, match="DESCRIBE_REPLY body of 201 bytes, above the limit of 100"):
        describe(w.path, 100, 5)


def test_worker_errors_carry_their_status(worker):
    w = worker(Picky())

    async def main():
        channel = WorkerHop(w.path, MAX)
        with pytest.raises(WorkerStatus) as err:
            await channel.infer(request(np.ones((1, 1), np.float32)), 10)
        with pytest.raises(WorkerStatus) as bad:
            await channel.infer(b"\xff\xff\xff", 10)
        channel.close()
        return err.value, bad.value
    err, bad = run(main())
    assert (err.code, err.message) == (hop.INVALID_ARGUMENT, "input 'x' is not to my taste; see /etc/shadow")
    assert bad.code == hop.INVALID_ARGUMENT and bad.message.startswith("malformed ModelInferRequest")


class Viewing(Echo):
    """Records, per call, whether the input array the engine got is a view of the record's memfd mapping."""
    def __init__(self):
        super().__init__()
        self.mapped = []

    def responses(self, inputs, *, streaming, cancelled):
        base = inputs["x"]
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        self.mapped.append(isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap))
        yield from super().responses(inputs, streaming=streaming, cancelled=cancelled)


def test_a_large_request_reaches_the_engine_as_views_of_its_mapping(worker):
    """A memfd body's raw inputs are not copied by protobuf: the engine's arrays view the worker's read-only
    mapping, wherever the raw entries stand in the request; small (inline) requests parse as before.
    Every answer exact, and nothing stays mapped once the calls are done."""
    engine = Viewing()
    w = worker(engine)
    big = np.random.default_rng(1).standard_normal((50_000, 4)).astype(np.float32)   # 800 KB: a memfd body
    head = pb.ModelInferRequest(model_name="m")
    head.inputs.add(name="x", datatype="FP32", shape=list(big.shape))
    raw_first = wire.length_delimited_header(wire.RAW_INPUT_FIELD, big.nbytes) + big.tobytes() + head.SerializeToString()
    before = open_fds()

    async def main():
        channel = WorkerHop(w.path, MAX)
        got = [outputs(await channel.infer(body, 10))["y"] for body in
               (request(big), raw_first, request(big[:2]))]
        with pytest.raises(WorkerStatus) as bad:   # a large body cut inside its last field
            await channel.infer(request(big)[:-1], 10)
        channel.close()
        return got, bad.value
    got, bad = run(main())
    for y, x in zip(got, (big, big, big[:2])):
        np.testing.assert_array_equal(y, x)
    assert engine.mapped == [True, True, False]
    assert (bad.code, bad.message) == (hop.INVALID_ARGUMENT, "malformed ModelInferRequest: truncated field")
    assert no_fd_left(before)   # the worker unmapped every body once its call was done


def test_large_requests_cross_in_the_workers_reused_input_arenas(worker):
    """A request too large to go inline is copied into one of the worker's input arenas, which goes back to
    its pool once the worker has ended the call (an error or a cancel included) and serves the next call
    (a smaller request after a larger one comes back exact: the worker maps only its length). The arena
    of a call that timed out is closed, not reused: the worker may still be reading it."""
    engine = Echo()
    w = worker(engine)
    big = np.random.default_rng(2).standard_normal((50_000, 4)).astype(np.float32)   # 800 KB
    small = big[:20_000] + 1                                                           # 320 KB
    before = open_fds()

    async def main():
        channel = WorkerHop(w.path, MAX)
        pool = channel.input_arenas
        got = [outputs(await channel.infer(request(big), 10))["y"]]
        first = list(pool._free)
        got.append(outputs(await channel.infer(request(small), 10))["y"])
        assert len(first) == 1 and pool._free == first        # the same arena, again
        engine.gate = threading.Event()                       # the next call waits at the engine...
        task = asyncio.ensure_future(channel.infer(request(small), 10))
        await asyncio.sleep(0.2)
        assert pool._free == []                               # ...holding the arena
        task.cancel()
        await asyncio.sleep(0.2)
        assert pool._free == []                               # cancelled, the worker not done with it yet
        engine.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool._free == first                            # the worker ended it: back
        engine.gate, engine.delays = None, [1.0]
        with pytest.raises(HopTimeout):
            await channel.infer(request(small), 0.3)
        assert pool._free == [] and first[0].mapping.closed   # timed out: closed, never reused
        channel.close()   # (the supervisor kills a worker that timed out)
        return got
    got = run(main())
    for y, x in zip(got, (big, small)):
        np.testing.assert_array_equal(y, x)
    assert no_fd_left(before)


class Grows(Plain):
    """Answers three times its input: a response larger than the request (and its response arena)."""

    def infer(self, inputs):
        return {"y": np.concatenate([inputs["x"]] * 3)}


def test_large_responses_come_back_in_the_calls_response_arena(worker):
    """A large unary request gets a response arena: the worker writes the response body there (no fresh
    memfd), the supervisor reads it through a mapping of exactly its length, and the arena goes back to
    the pool when that body is released, to serve the next call. A response that does not fit travels as
    a memfd, and its arena goes back as soon as the call ends; a stream gets none; after a timeout the
    arena is closed, not reused (the worker may still write it)."""
    engine = Echo()
    w, w2 = worker(engine), worker(Grows())
    big = np.random.default_rng(3).standard_normal((50_000, 4)).astype(np.float32)   # 800 KB
    small = big[:20_000] - 1                                                           # 320 KB
    before = open_fds()

    async def main():
        channel = WorkerHop(w.path, MAX)
        pool = channel.output_arenas
        body = await channel.infer(request(big), 10)
        assert isinstance(body, ArenaBody) and pool._free == []   # the arena is the body's while it is held
        got = [outputs(body)["y"]]
        first = list(pool._free)
        assert len(first) == 1 and first[0].capacity >= len(request(big)) + hop.INLINE_MAX
        body = await channel.infer(request(small), 10)
        assert isinstance(body, ArenaBody)
        got.append(outputs(body)["y"])
        assert pool._free == first                                 # the same arena, again
        engine.delays = [1.0]
        with pytest.raises(HopTimeout):
            await channel.infer(request(small), 0.3)
        assert pool._free == [] and first[0].mapping.closed       # timed out: closed, never reused
        channel.close()
        return got
    got = run(main())
    np.testing.assert_array_equal(got[0], big)
    np.testing.assert_array_equal(got[1], small)

    async def larger_and_stream():
        channel = WorkerHop(w2.path, MAX)
        body = await channel.infer(request(big), 10)
        assert not isinstance(body, ArenaBody) and isinstance(body, mmap.mmap)   # a memfd of its own
        assert len(channel.output_arenas._free) == 1               # the unused arena is back already
        grown = outputs(body)["y"]
        streamed = [(body, final) async for body, final in channel.stream(request(big), 10)]
        assert [final for _, final in streamed] == [True] and not isinstance(streamed[0][0], ArenaBody)
        streamed_y = outputs(streamed[0][0])["y"]
        channel.close()
        return grown, streamed_y
    grown, streamed_y = run(larger_and_stream())
    np.testing.assert_array_equal(grown, np.concatenate([big] * 3))
    np.testing.assert_array_equal(streamed_y, np.concatenate([big] * 3))
    assert no_fd_left(before)


# ---- streams ---------------------------------------------------------------------------------------
def test_decoupled_stream_several_responses_then_the_end(worker):
    """An engine overriding responses() streams: each response leaves at once, a FINAL record with an
    empty body ends the call (Triton's decoupled convention)."""
    w = worker()
    x = np.full((3, 2), 7, np.float32)   # 3 rows: the engine streams 3 responses

    async def main():
        channel = WorkerHop(w.path, MAX)
        seen = [(bytes(body), final) async for body, final in channel.stream(request(x), 10)]
        channel.close()
        return seen
    seen = run(main())
    assert [final for _, final in seen] == [False, False, False, True]
    assert seen[-1][0] == b""
    for step, (body, _) in enumerate(seen[:3]):
        np.testing.assert_array_equal(outputs(body)["y"], x + step)


def test_a_one_response_engine_streams_one_final_response(worker):
    w = worker(Plain())
    x = np.full((3, 2), 7, np.float32)

    async def main():
        channel = WorkerHop(w.path, MAX)
        seen = [(outputs(body)["y"], final) async for body, final in channel.stream(request(x), 10)]
        channel.close()
        return seen
    (y, final), = run(main())
    assert final is True
    np.testing.assert_array_equal(y, x)


def test_a_decoupled_response_is_not_held_back_for_the_next(worker):
    """The first response reaches the supervisor while the engine is still making the second."""
    engine = Echo()
    w = worker(engine)

    async def main():
        channel = WorkerHop(w.path, MAX)
        responses = channel.stream(request(np.full((5, 1), -1, np.float32)), 10)   # waits after each
        start = time.monotonic()
        body, final = await responses.__anext__()
        first = time.monotonic() - start
        hop.release(body)
        await responses.aclose()
        channel.close()
        return first, final
    first, final = run(main())
    assert final is False and first < 5


def test_a_unary_call_answered_twice_is_internal(worker):
    w = worker(Twice())

    async def main():
        channel = WorkerHop(w.path, MAX)
        with pytest.raises(WorkerStatus) as err:
            await channel.infer(request(np.ones((1, 1), np.float32)), 10)
        channel.close()
        return err.value
    err = run(main())
    assert (err.code, err.message) == (hop.INTERNAL, "the engine answered a unary call more than once")


def test_the_reader_waits_while_queued_calls_hold_the_descriptors_it_has_room_for(worker):
    """Each queued memfd-sized call holds two descriptors (its body's mapping and its response arena); a
    worker with room for two reads no further record until the engine has finished calls, instead of
    running out of descriptors (with shared-memory arenas, up to 33 per call, 256 were soon gone). Every
    call is still answered exactly, in order."""
    engine = Echo()
    engine.gate = threading.Event()
    w = worker(engine)
    w.server.fd_room = 2
    seen = []

    async def main():
        channel = WorkerHop(w.path, MAX)
        calls = [asyncio.ensure_future(channel.infer(request(np.full((2**15, 4), i, np.float32)), 30))
                 for i in range(6)]   # 512 KiB each: memfd bodies
        while len(channel.order) < 6:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        seen.append((w.server._held_fds, w.server.calls.qsize()))
        engine.gate.set()
        bodies = await asyncio.gather(*calls)
        channel.close()
        return [outputs(b)["y"] for b in bodies]
    results = run(main())
    assert seen == [(4, 1)]   # read while 0 and 2 were held: 4 held (one call at the engine, 1 queued), 4 unread
    for i, y in enumerate(results):
        assert y.shape == (2**15, 4) and (y == i).all()
    assert engine.calls == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    # The engine thread releases a call's record right after sending its answer: waited for briefly.
    deadline = time.monotonic() + 3
    while w.server._held_fds and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.server._held_fds == 0


# ---- cancellation ----------------------------------------------------------------------------------
def test_cancel_drops_a_queued_call(worker):
    engine = Echo()
    engine.gate = threading.Event()
    w = worker(engine)
    before = open_fds()

    async def main():
        channel = WorkerHop(w.path, MAX)
        first = asyncio.ensure_future(channel.infer(request(np.full((1, 1), 1, np.float32)), 10))
        big = np.full((2**20, 4), 2, np.float32)   # a memfd-sized call, queued behind the first
        second = asyncio.ensure_future(channel.infer(request(big), 10))
        while len(channel.order) < 2 or not engine.calls:
            await asyncio.sleep(0.01)
        second.cancel()   # the client went away
        await asyncio.sleep(0.05)
        engine.gate.set()
        body = await first
        with pytest.raises(asyncio.CancelledError):
            await second
        assert channel.calls == {}   # the worker ended the cancelled call too
        channel.close()
        return outputs(body)
    assert run(main())["y"].tolist() == [[1.0]]
    assert engine.calls == [1.0]   # the cancelled call never reached the engine
    assert no_fd_left(before)


def test_a_call_cancelled_twice_still_waits_for_the_worker(worker):
    """grpc.aio may cancel a handler more than once (the client leaves, then the server stops): the
    abandoned call must still end only once the worker has ended it, so its turn is never given back
    while the worker still runs it."""
    engine = Echo()
    engine.gate = threading.Event()
    w = worker(engine)

    async def main():
        channel = WorkerHop(w.path, MAX)
        call = asyncio.ensure_future(channel.infer(request(np.full((1, 1), 1, np.float32)), 10))
        while not engine.calls:   # running at the engine, held by the gate
            await asyncio.sleep(0.01)
        call.cancel()
        await asyncio.sleep(0.05)
        call.cancel()   # again, while it waits for the worker's end
        await asyncio.sleep(0.2)
        assert not call.done()   # the worker has not ended it: it is still held
        engine.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert channel.calls == {} and not channel.order
        channel.close()
    run(main())


def test_an_abandoned_call_the_worker_never_ends_breaks_the_hop_at_its_timeout(worker):
    """A cancelled call whose worker ignores the CANCEL (the engine keeps running) is not held for ever:
    at its inference timeout the hop is declared broken (the supervisor then kills the worker), as a
    call that times out with its client still waiting would."""
    engine = Echo()
    engine.gate = threading.Event()
    w = worker(engine)
    broken = []

    async def main():
        channel = WorkerHop(w.path, MAX)
        channel.on_broken = broken.append
        call = asyncio.ensure_future(channel.infer(request(np.full((1, 1), 1, np.float32)), 0.5))
        while not engine.calls:
            await asyncio.sleep(0.01)
        call.cancel()   # the worker's engine is held by the gate: the call cannot end
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await call
        waited = time.monotonic() - started
        assert channel.closed and channel.calls == {}
        return waited
    try:
        waited = run(main())
    finally:
        engine.gate.set()
    assert 0.3 < waited < 3, waited
    assert broken == ["an abandoned call was not ended within 0.5 s"]


def test_cancel_stops_a_running_stream(worker):
    engine = Echo()
    w = worker(engine)

    async def main():
        channel = WorkerHop(w.path, MAX)
        x = np.full((5, 1), -1, np.float32)   # negative: the engine waits for a cancel after each response
        responses = channel.stream(request(x), 10)
        body, final = await responses.__anext__()
        hop.release(body)
        await responses.aclose()   # the client stops reading
        assert channel.calls == {}
        channel.close()
        return final
    assert run(main()) is False
    assert engine.stopped_early.wait(5)


# ---- pipelining and the timeout counted from the take --------------------------------------------
def test_pipelined_calls_all_answered_exactly(worker):
    w = worker()

    async def main():
        channel = WorkerHop(w.path, MAX)
        xs = [np.full((i % 7 + 1, 3), i, np.float32) for i in range(40)]
        bodies = await asyncio.gather(*(channel.infer(request(x), 10) for x in xs))
        channel.close()
        return xs, [outputs(b)["y"] for b in bodies]
    xs, ys = run(main())
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(x, y)


def test_timeout_runs_from_the_take():
    """Three calls sent at once, each 0.3 s at the engine, timeout 0.5 s: the third ends 0.9 s after it
    was sent but 0.3 s after it was taken, so none times out; a call slower than the timeout does."""
    engine = Echo()
    w = Worker(engine)
    try:
        engine.delays = [0.3, 0.3, 0.3, 0.8]

        async def main():
            channel = WorkerHop(w.path, MAX)
            x = np.ones((1, 1), np.float32)
            start = time.monotonic()
            bodies = await asyncio.gather(*(channel.infer(request(x), 0.5) for _ in range(3)))
            elapsed = time.monotonic() - start
            for b in bodies:
                hop.release(b)
            with pytest.raises(HopTimeout):
                await channel.infer(request(x), 0.5)
            channel.close()
            return elapsed
        assert run(main()) >= 0.9
    finally:
        w.stop()


# ---- malformed records -----------------------------------------------------------------------------
def _memfd(data: bytes, seal: bool = True) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    return fd


def _send_raw(sock, data: bytes, fds=()):
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


BIG = hop.INLINE_MAX + 10
MALFORMED = {
    "oversized length": (lambda: (hop.header(hop.INFER, 1, MAX + 1), [])),
    "unknown kind": (lambda: (hop.header(99, 1, 0), [])),
    "unknown flag": (lambda: (hop.header(hop.INFER, 1, 0, flags=0x80), [])),
    "short header": (lambda: (b"\x03\x00", [])),
    "length differs from the body": (lambda: (hop.header(hop.INFER, 1, 10) + b"abc", [])),
    "too many fds": (lambda: (hop.header(hop.INFER, 1, BIG, flags=hop.MEMFD), [_memfd(b"x" * BIG), _memfd(b"y")])),
    # (an INFER body may sit at the start of a larger input arena; a shorter memfd is refused)
    "fd size differs": (lambda: (hop.header(hop.INFER, 1, BIG, flags=hop.MEMFD), [_memfd(b"x" * (BIG - 1))])),
    "unsealed memfd": (lambda: (hop.header(hop.INFER, 1, BIG, flags=hop.MEMFD), [_memfd(b"x" * BIG, seal=False)])),
    # (before, the OSError from F_GET_SEALS made Describe at load retry until the load timeout)
    "an O_PATH descriptor as the body": (lambda: (hop.header(hop.RESPONSE, 1, BIG, flags=hop.MEMFD | hop.FINAL),
                                                  [os.open(__file__, os.O_PATH)])),
    "fd without the memfd flag": (lambda: (hop.header(hop.INFER, 1, 0), [_memfd(b"x")])),
    "shm flag on a cancel": (lambda: (hop.header(hop.CANCEL, 1, 0, flags=hop.SHM), [_memfd(b"x")])),
    "shm flag without tensors": (lambda: (hop.header(hop.INFER, 1, 0, flags=hop.SHM), [])),
    "more shm tensors than allowed": (lambda: (hop.header(hop.INFER, 1, 0, flags=hop.SHM),
                                               [_memfd(b"x") for _ in range(hop.MAX_SHM_FDS + 2)])),
    "unsealed shm input": (lambda: (hop.header(hop.INFER, 1, 0, flags=hop.SHM, side=8) + hop.SHM_SIZE.pack(1),
                                    [_memfd(b"x", seal=False)])),
    "shm input without its size": (lambda: (hop.header(hop.INFER, 1, 0, flags=hop.SHM), [_memfd(b"x")])),
    "shm input past its arena": (lambda: (hop.header(hop.INFER, 1, 0, flags=hop.SHM, side=8) + hop.SHM_SIZE.pack(2),
                                          [_memfd(b"x")])),
    "unsealed output arena": (lambda: (hop.header(hop.INFER, 1, 0, flags=hop.SHM, side=8)
                                       + hop.SHM_SIZE.pack(hop.OUTPUT_ARENA), [_memfd(b"x", seal=False)])),
    "a response's own shm descriptor": (lambda: (hop.header(hop.RESPONSE, 1, 0, flags=hop.SHM | hop.FINAL),
                                                 [_memfd(b"x")])),
    "unsealed response arena": (lambda: (hop.header(hop.INFER, 1, 0, flags=hop.SHM, side=8)
                                         + hop.SHM_SIZE.pack(hop.RESPONSE_ARENA), [_memfd(b"x", seal=False)])),
    "two response arenas": (lambda: (hop.header(hop.INFER, 1, 0, flags=hop.SHM, side=16)
                                     + hop.SHM_SIZE.pack(hop.RESPONSE_ARENA) * 2, [_memfd(b"x"), _memfd(b"y")])),
}
TO_THE_SUPERVISOR = {"a response's own shm descriptor", "an O_PATH descriptor as the body"}   # the others are received as a worker would
REASONS = {
    "oversized length": f"INFER body of {MAX + 1} bytes, above the limit of {MAX}",
    "unknown kind": "unexpected record kind 99",
    "unknown flag": "unknown flags 0x80 on a INFER record",
    "short header": "record of 2 bytes, shorter than the 20-byte header",
    "length differs from the body": "record carries 3 body bytes, its header says 10",
    "too many fds": "more than 1 file descriptor(s) attached to a record",
    "fd size differs": f"the attached memfd holds {BIG - 1} bytes, its header says {BIG}",
    "unsealed memfd": "the attached memfd is not sealed",
    "an O_PATH descriptor as the body": "the attached descriptor cannot be checked (Bad file descriptor)",
    "fd without the memfd flag": "file descriptor attached to a record without a memfd body",
    "shm flag on a cancel": "shared-memory tensors on a CANCEL record",
    "shm flag without tensors": "shared-memory tensors flagged, none attached",
    "more shm tensors than allowed": f"more than {hop.MAX_FDS} file descriptor(s) attached to a record",
    "unsealed shm input": "the attached input arena is not sealed",
    "shm input without its size": "shared-memory tensors: 1 attached, 0 sizes in the side data",
    "shm input past its arena": "the attached input arena holds 1 bytes, its input 2",
    "unsealed output arena": "the attached output arena is not sealed",
    "a response's own shm descriptor": "a response's shared-memory outputs are in the supervisor's arenas, not in "
                                       "descriptors of its own",
    "unsealed response arena": "the attached response arena is not sealed",
    "two response arenas": "more than one response arena",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_hop_recv_refuses_malformed_records(case):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    data, fds = MALFORMED[case]()
    before = open_fds() - {str(fd) for fd in fds}
    _send_raw(a, data, fds)
    for fd in fds:
        os.close(fd)
    with pytest.raises(hop.ProtocolError) as err:
        hop.recv(b, MAX, hop.TO_SUPERVISOR if case in TO_THE_SUPERVISOR else hop.TO_WORKER)
    assert str(err.value) == REASONS[case]
    a.close(), b.close()
    assert open_fds() <= before   # every received descriptor was closed


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_worker_closes_the_connection_on_a_malformed_record(worker, case):
    engine = Echo()
    w = worker(engine)
    sock = hop.connect(w.path)
    sock.settimeout(5)
    data, fds = MALFORMED[case]()
    _send_raw(sock, data, fds)
    for fd in fds:
        os.close(fd)
    assert sock.recv(64) == b""   # closed by the worker
    sock.close()
    assert engine.calls == []

    async def still_serves():
        channel = WorkerHop(w.path, MAX)
        body = await channel.infer(request(np.ones((1, 1), np.float32)), 10)
        channel.close()
        return outputs(body)
    assert run(still_serves())["y"].tolist() == [[1.0]]


def _one_call_worker(answer):
    """A hostile worker: accepts one connection, reads one record, answers with `answer(record)` ->
    (bytes, fds), which may write the record's arenas first; closes everything it received."""
    directory = tempfile.mkdtemp()
    listener = hop.listen(f"{directory}/worker.sock")

    def serve():
        conn, _ = listener.accept()
        record = hop.recv(conn, MAX, hop.TO_WORKER)
        try:
            data, fds = answer(record)
        finally:
            record.release()
        _send_raw(conn, data, fds)
        for fd in fds:
            os.close(fd)
        time.sleep(0.5)
        conn.close()
        listener.close()
    threading.Thread(target=serve, daemon=True).start()
    return f"{directory}/worker.sock"


def _fake_worker(answer):
    """Answers with `answer(call_id)` -> (bytes, fds)."""
    return _one_call_worker(lambda record: answer(record.call_id))


SUPERVISOR_MALFORMED = {
    "shared-memory outputs on a non-final record": lambda cid: (
        hop.header(hop.RESPONSE, cid, 0, flags=hop.SHM, side=8) + hop.SHM_SIZE.pack(1), []),
    "shared-memory output sizes for a call without output arenas": lambda cid: (
        hop.header(hop.RESPONSE, cid, 0, flags=hop.SHM | hop.FINAL, side=8) + hop.SHM_SIZE.pack(1), []),
    "a response's own shared-memory descriptor": lambda cid: (
        hop.header(hop.RESPONSE, cid, 0, flags=hop.SHM | hop.FINAL), [_memfd(b"y")]),
    "oversized length": lambda cid: (hop.header(hop.RESPONSE, cid, MAX + 1, flags=hop.FINAL), []),
    "unknown kind": lambda cid: (hop.header(99, cid, 0), []),
    "a kind only the worker receives": lambda cid: (hop.header(hop.INFER, cid, 0), []),
    "too many fds": lambda cid: (hop.header(hop.RESPONSE, cid, BIG, flags=hop.MEMFD | hop.FINAL),
                                 [_memfd(b"x" * BIG), _memfd(b"y")]),
    "fd size differs": lambda cid: (hop.header(hop.RESPONSE, cid, BIG, flags=hop.MEMFD | hop.FINAL),
                                    [_memfd(b"x" * (BIG - 1))]),
    "unsealed memfd": lambda cid: (hop.header(hop.RESPONSE, cid, BIG, flags=hop.MEMFD | hop.FINAL),
                                   [_memfd(b"x" * BIG, seal=False)]),
    "unknown call id": lambda cid: (hop.header(hop.RESPONSE, cid + 7, 0, flags=hop.FINAL), []),
    "a unary call answered not final": lambda cid: (hop.header(hop.RESPONSE, cid, 0), []),
}


@pytest.mark.parametrize("case", sorted(SUPERVISOR_MALFORMED))
def test_supervisor_hop_closes_on_a_malformed_record(case):
    path = _fake_worker(SUPERVISOR_MALFORMED[case])
    before = open_fds()

    broken = []

    async def main():
        channel = WorkerHop(path, MAX)
        channel.on_broken = broken.append   # the supervisor kills such a worker (worker_process.py)
        with pytest.raises(HopClosed) as err:
            await channel.infer(request(np.ones((1, 1), np.float32)), 10)
        assert channel.closed and channel.sock is None
        return str(err.value)
    reason = run(main())
    assert reason.startswith("the worker broke the hop protocol"), reason
    assert broken == [reason]
    assert no_fd_left(before)


def _arena_worker(answer):
    """A worker for one call with output arenas: writes b"abc" into each, answers with `answer(call_id,
    sizes)` (a header + side data)."""
    return _one_call_worker(lambda record: (
        answer(record.call_id, [hop.fill_output_arena(fd, b"abc") for fd in record.outputs]), []))


def _final_with_sizes(cid, sizes):
    side = b"".join(hop.SHM_SIZE.pack(n) for n in sizes)
    return hop.header(hop.RESPONSE, cid, 0, flags=hop.FINAL | hop.SHM, side=len(side)) + side


@pytest.mark.parametrize("answer, expected", [
    (_final_with_sizes, [3]),
    (lambda cid, sizes: hop.header(hop.RESPONSE, cid, 0, flags=hop.FINAL), "broken"),   # sizes missing
    (lambda cid, sizes: _final_with_sizes(cid, []), "broken"),                          # SHM flag, no size
])
def test_supervisor_hop_with_an_output_arena(answer, expected):
    """The worker writes into the supervisor's output arena and gives the size in its final RESPONSE;
    a final RESPONSE that does not give it breaks the hop."""
    path = _arena_worker(answer)
    before = open_fds()
    arenas = Arenas(outputs=True)
    arena = arenas.take(3)
    broken = []

    async def main():
        channel = WorkerHop(path, MAX)
        channel.on_broken = broken.append
        try:
            body, sizes = await channel.infer_shared(request(np.ones((1, 1), np.float32)), 10, [arena.fd],
                                                     [hop.OUTPUT_ARENA])
        except HopClosed as exc:
            return str(exc)
        hop.release(body)
        channel.close()
        return sizes
    result = run(main())
    if expected == "broken":
        assert result.startswith("the worker broke the hop protocol") and broken == [result]
    else:
        assert result == expected and arena.mapping[:3] == b"abc"
    arenas.give(arena)
    arenas.close()
    assert no_fd_left(before)


def _response_arena_worker(write: bytes, answer):
    """A worker for one large unary call: writes `write` into the call's response arena, then answers
    with `answer(call_id, capacity)` (a record's bytes)."""
    def handle(record):
        os.lseek(record.response_arena, 0, os.SEEK_SET)
        os.write(record.response_arena, write)
        return answer(record.call_id, os.fstat(record.response_arena).st_size), []
    return _one_call_worker(handle)


VALID_BODY = tensors.encode_response(pb.ModelInferResponse(model_name="m"), {"y": np.ones((30_000, 1), np.float32)})
BOTH_OR_LONGER = ("the worker broke the hop protocol: a response both in its arena and in the record, or longer than its "
                  "arena leaves room for")


@pytest.mark.parametrize("answer, expected", [
    (lambda cid, capacity: _final_with_sizes(cid, [len(VALID_BODY)]), "served"),
    (lambda cid, capacity: _final_with_sizes(cid, [capacity + 1]), BOTH_OR_LONGER),
    (lambda cid, capacity: _final_with_sizes(cid, [capacity - hop.RESPONSE_TAIL_ROOM + 1]), BOTH_OR_LONGER),
    (lambda cid, capacity: hop.header(hop.RESPONSE, cid, 1, flags=hop.FINAL | hop.SHM, side=8)
     + hop.SHM_SIZE.pack(len(VALID_BODY)) + b"x", BOTH_OR_LONGER),
    (lambda cid, capacity: hop.header(hop.RESPONSE, cid, 1, flags=hop.FINAL) + b"x",    # its size missing
     "the worker broke the hop protocol: an unexpected record"),
])
def test_supervisor_hop_with_a_response_arena(answer, expected):
    """What a worker may say about a body in its call's response arena: its length, at most the arena's,
    and then nothing in the record itself; anything else breaks the hop."""
    path = _response_arena_worker(VALID_BODY, answer)
    before = open_fds()
    broken = []

    async def main():
        channel = WorkerHop(path, MAX)
        channel.on_broken = broken.append
        try:
            body = await channel.infer(request(np.ones((30_000, 1), np.float32)), 10)
        except HopClosed as exc:
            return str(exc)
        data = copy_out(body, b"")
        hop.release(body)
        assert len(channel.output_arenas._free) == 1   # given back with the body
        channel.close()
        return data
    result = run(main())
    if expected == "served":
        assert result == VALID_BODY
    else:
        assert result == expected and broken == [expected]
    assert no_fd_left(before)


def test_a_response_in_its_arena_is_checked_once_copied_out():
    """A body in the response arena that would swallow the supervisor's provenance (it ends inside a
    length-delimited field) is refused like any other, and its arena is given back."""
    from types import SimpleNamespace

    from sealbox.daemon import errors
    from sealbox.daemon.supervisor import Supervisor
    swallowing = VALID_BODY + wire.length_delimited_header(wire.RAW_OUTPUT_FIELD, 64)
    path = _response_arena_worker(swallowing, lambda cid, capacity: _final_with_sizes(cid, [len(swallowing)]))
    model = SimpleNamespace(failures={0: "an earlier death"})
    stamp = wire.string_parameters(wire.INFER_RESPONSE_PARAMETERS, {"sealbox_version": "test"})

    async def main():
        channel = WorkerHop(path, MAX)
        body = await channel.infer(request(np.ones((30_000, 1), np.float32)), 10)
        assert isinstance(body, ArenaBody)
        with pytest.raises(errors.ClientError) as refused:
            await Supervisor._stamped(None, "m", model, SimpleNamespace(stamp=stamp, slot=0), body, None)
        assert len(channel.output_arenas._free) == 1
        channel.close()
        return refused.value
    refused = run(main())
    assert (refused.code, refused.message) == (grpc.StatusCode.INTERNAL, "model 'm' failed")
    assert model.failures == {0: "an earlier death"}   # it did not serve


def test_a_body_the_worker_never_wrote_allocates_nothing_in_the_supervisor():
    """A worker that reports 512 KiB in its response arena without writing them: the supervisor reads
    the arena with pread, never through a mapping, so the holes read as zeros and allocate no page of
    its own (through a mapping, each page read would be allocated, charged to the root process); the
    zeros are refused as a malformed response."""
    from types import SimpleNamespace

    from sealbox.daemon import errors
    from sealbox.daemon.supervisor import Supervisor
    path = _response_arena_worker(b"", lambda cid, capacity: _final_with_sizes(cid, [512 * 1024]))
    stamp = wire.string_parameters(wire.INFER_RESPONSE_PARAMETERS, {"sealbox_version": "test"})

    async def main():
        channel = WorkerHop(path, MAX)
        body = await channel.infer(request(np.ones((30_000, 1), np.float32)), 10)
        arena = body.arena
        with pytest.raises(errors.ClientError) as refused:
            await Supervisor._stamped(None, "m", SimpleNamespace(failures={}), SimpleNamespace(stamp=stamp, slot=0),
                                      body, None)
        allocated = os.fstat(arena.fd).st_blocks * 512
        assert channel.output_arenas._free == [arena]
        channel.close()
        return refused.value, allocated
    refused, allocated = run(main())
    assert (refused.code, refused.message) == (grpc.StatusCode.INTERNAL, "model 'm' failed")
    assert allocated <= 4096   # the one page the supervisor's own parameters went into


def test_the_hop_closes_arenas_left_unused(monkeypatch):
    """After a shared-memory call the hop checks its arenas again ARENA_IDLE_S later (30 s; 0.2 s here):
    those unused that long are closed, and it keeps checking while any are kept."""
    from sealbox.daemon import worker_hop
    monkeypatch.setattr(worker_hop, "ARENA_IDLE_S", 0.2)

    async def main():
        channel = WorkerHop("/nonexistent/worker.sock", MAX)   # never connected: arenas only
        arena = channel.output_arenas.take(1)
        channel.output_arenas.give(arena)
        channel.trim_arenas_later()
        await asyncio.sleep(0.05)
        os.fstat(arena.fd)                        # not idle long enough yet
        await asyncio.sleep(0.6)
        with pytest.raises(OSError):
            os.fstat(arena.fd)
        assert channel._trim_timer is None        # nothing kept: no more checks
        channel.close()
    run(main())


def test_supervisor_hop_fails_pending_calls_when_the_worker_goes():
    path = _fake_worker(lambda cid: (b"", []))   # an empty record reads as end of stream
    before = open_fds()

    async def main():
        channel = WorkerHop(path, MAX)
        big = np.ones((2**20, 4), np.float32)
        with pytest.raises(HopClosed, match="closed its connection"):
            await channel.infer(request(big), 10)
    run(main())
    assert no_fd_left(before)


def test_header_layout():
    """The frame header is fixed: 20 bytes, little-endian, fields in this order."""
    assert hop.HEADER.size == 20
    assert hop.header(hop.RESPONSE, 7, 300, flags=hop.FINAL, code=3, side=5) == struct.pack(
        "<BBHIIQ", 4, 1, 3, 7, 5, 300)


def test_cancel_while_the_request_memfd_is_made_leaks_nothing(worker):
    """A client gone while its large request is still being copied into a memfd (off the loop)."""
    w = worker()
    before = open_fds()

    async def main():
        channel = WorkerHop(w.path, MAX)
        big = np.ones((2**21, 4), np.float32)   # 32 MiB: the memfd is made on a thread
        for _ in range(3):
            task = asyncio.ensure_future(channel.infer(request(big), 10))
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        body = await channel.infer(request(np.ones((1, 1), np.float32)), 10)   # still serves
        await asyncio.sleep(0.3)   # the executor finishes the abandoned copies
        channel.close()
        return outputs(body)
    assert run(main())["y"].tolist() == [[1.0]]
    assert no_fd_left(before)


def test_a_batching_workers_claimed_execution_time_is_bounded():
    """A batching worker reports each engine call's rows and time (EXECUTION side data, statistics only).
    A worker claiming 2**64 - 1 ns is counted as the inference timeout at most, and sums past uint64
    saturate: ModelStatistics keeps working (it failed to build its uint64 field for every model)."""
    from sealbox.daemon.metrics import Duration, Metrics
    from sealbox.daemon.server import UINT64_MAX, add_statistics
    side = hop.EXECUTION.pack(1, 0, 2**64 - 1)
    path = _fake_worker(lambda cid: (hop.header(hop.RESPONSE, cid, 0, flags=hop.FINAL, side=len(side)) + side, []))
    metrics, timeout = Metrics(), 10

    async def main():
        channel = WorkerHop(path, MAX)
        channel.on_execution = lambda rows, ns: metrics.observe_execution("m", "1", rows, ns, int(timeout * 1e9))
        hop.release(await channel.infer(request(np.ones((1, 1), np.float32)), timeout))
        channel.close()
    run(main())
    stats = metrics.statistics()[("m", "1")]
    assert stats.batches[1].count == 1 and stats.batches[1].ns == 10 * 10**9
    stats.batches[1] = Duration(count=3, ns=3 * (2**64 - 1))   # what unbounded sums reached before
    entry = pb.ModelStatisticsResponse().model_stats.add(name="m", version="1")
    add_statistics(entry, stats)
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in entry.batch_stats] == \
        [(1, 3, UINT64_MAX)]


def test_a_memfd_body_with_holes_breaks_the_hop_and_allocates_nothing():
    """A worker's memfd body made by ftruncate alone (nothing written) would have the supervisor's
    mapping allocate every page, for the root process; it is refused before it is mapped."""
    length, kept = 4 << 20, []

    def sparse(cid):
        fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, length)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
        kept.append(os.dup(fd))
        return hop.header(hop.RESPONSE, cid, length, flags=hop.MEMFD | hop.FINAL), [fd]
    path = _fake_worker(sparse)
    broken = []

    async def main():
        channel = WorkerHop(path, MAX)
        channel.on_broken = broken.append
        with pytest.raises(HopClosed):
            await channel.infer(request(np.ones((1, 1), np.float32)), 10)
    run(main())
    assert broken == ["the worker broke the hop protocol: the attached memfd has holes: 0 of its 4194304 bytes written"]
    assert os.fstat(kept[0]).st_blocks == 0   # no page of it was allocated
    os.close(kept[0])
    # A body the sender wrote whole is taken.
    whole = _memfd(b"x" * (hop.INLINE_MAX + 1))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _send_raw(a, hop.header(hop.RESPONSE, 1, hop.INLINE_MAX + 1, flags=hop.MEMFD | hop.FINAL), [whole])
    record = hop.recv(b, MAX, hop.TO_SUPERVISOR)
    assert bytes(record.body) == b"x" * (hop.INLINE_MAX + 1)
    record.release()
    for fd in (whole, a.detach(), b.detach()):
        os.close(fd)


def test_a_stream_whose_client_falls_behind_is_cancelled_not_piled_up():
    """A worker floods a stream with responses its client does not take (a client that stopped reading,
    or a hostile worker): past MAX_STREAM_BACKLOG the supervisor lets go of all of them and cancels the
    call, instead of holding a descriptor and a mapping (or an inline body) for each without limit."""
    from sealbox.daemon.worker_hop import MAX_STREAM_BACKLOG, StreamBacklog
    flood, seen = 4 * MAX_STREAM_BACKLOG, []
    directory = tempfile.mkdtemp()
    listener = hop.listen(f"{directory}/worker.sock")

    def serve():
        conn, _ = listener.accept()
        record = hop.recv(conn, MAX, hop.TO_WORKER)
        record.release()
        for _ in range(flood):
            fd = _memfd(b"r" * (hop.INLINE_MAX + 1))
            _send_raw(conn, hop.header(hop.RESPONSE, record.call_id, hop.INLINE_MAX + 1, flags=hop.MEMFD), [fd])
            os.close(fd)
        cancel = hop.recv(conn, MAX, hop.TO_WORKER)
        seen.append((cancel.kind, cancel.call_id == record.call_id))
        hop.send_error(conn, record.call_id, hop.CANCELLED, "cancelled")
        time.sleep(0.5)
        conn.close()
        listener.close()
    threading.Thread(target=serve, daemon=True).start()
    before = open_fds()

    async def main():
        channel = WorkerHop(f"{directory}/worker.sock", MAX)
        responses = channel.stream(request(np.ones((1, 1), np.float32)), 10)
        body, final = await responses.__anext__()
        assert not final and len(body) == hop.INLINE_MAX + 1
        hop.release(body)
        await asyncio.sleep(1.0)   # the flood arrives; nobody takes it
        peak = len(open_fds() - before)
        taken = 0
        with pytest.raises(StreamBacklog, match=f"fell {MAX_STREAM_BACKLOG} responses behind"):
            while True:
                body, _final = await responses.__anext__()
                hop.release(body)
                taken += 1
        channel.close()
        return peak, taken
    peak, taken = run(main())
    assert taken == 0                                  # what was queued was let go, not handed on
    assert peak <= 2 * MAX_STREAM_BACKLOG + 8          # a mapping's descriptor pair per queued response, at most
    assert seen == [(hop.CANCEL, True)]                # the worker was told
    assert no_fd_left(before)


def test_a_record_that_cannot_be_made_keeps_no_descriptor():
    """The shared-memory descriptors an Outgoing duplicates are closed if its body memfd then cannot be
    made (here a strided array, which cannot be written as one byte run)."""
    arena = _memfd(b"a" * 4096)
    before = open_fds()
    strided = np.ones((300, 300), np.float32)[:, ::2]   # 180 KB: a memfd body
    with pytest.raises(TypeError):
        hop.Outgoing(hop.INFER, 1, [strided], shm_fds=[arena, arena])
    assert open_fds() == before
    os.close(arena)
