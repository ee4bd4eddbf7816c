"""Dynamic batching in the worker's serving loop, over a real hop socket: which calls share an engine
call, exact rows back to each, and what never joins a batch (a malformed request, another shape, a
stream, a cancelled call)."""
from __future__ import annotations

import asyncio
import tempfile
import threading

import numpy as np
import pytest

from sealbox.daemon.worker_hop import WorkerHop, WorkerStatus
from sealbox.proto import hop, inference_pb2 as pb, tensors
from sealbox.proto.contract import Batching
from sealbox.worker import batching
from sealbox.worker.engine import Engine, InferenceError, ModelError, TensorSpec
from sealbox.worker.serving import WorkerServer, describe_answer


class Rows(Engine):
    """y = 2x + row index within the engine call (so a wrong split shows), s = row sums; records the
    shape of every engine call; `gate` holds the first call so others queue behind it."""
    platform = "test"
    inputs = (TensorSpec("x", "FP32", (-1, -1)),)
    outputs = (TensorSpec("y", "FP32", (-1, -1)), TensorSpec("s", "FP32", (-1,)))

    def __init__(self):
        self.shapes, self.gate = [], threading.Event()

    @classmethod
    def load(cls, files):
        return cls()

    def infer(self, inputs):
        x = inputs["x"]
        self.shapes.append(x.shape)
        self.gate.wait(10)
        return {"y": x * 2, "s": x.sum(axis=1)}


def serve(engine, config):
    path = f"{tempfile.mkdtemp()}/worker.sock"
    server = WorkerServer(engine, 2**26, describe_answer(engine, {}), config)
    listener = hop.listen(path)
    threading.Thread(target=server.accept_forever, args=(listener,), daemon=True).start()
    threading.Thread(target=server.run_engine, daemon=True).start()
    return server, path


async def until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


def decode(body) -> dict:
    from sealbox.daemon.worker_hop import copy_out
    data = copy_out(body, b"")
    hop.release(body)
    return tensors.response_outputs(pb.ModelInferResponse.FromString(data))


def test_queued_calls_join_and_split_exactly():
    engine = Rows()
    server, path = serve(engine, Batching(8, 0))
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, 3)).astype(np.float32) for n in (1, 1, 2, 3, 2)]
    other = rng.standard_normal((2, 5)).astype(np.float32)   # another trailing dim: never joins
    executions = []

    async def main():
        h = WorkerHop(path, 2**26)
        h.on_execution = lambda rows, ns: executions.append(rows)
        first = asyncio.ensure_future(h.infer(tensors.encode_request("m", {"x": xs[0]}, None), 10))
        await until(lambda: engine.shapes)   # the first call holds the engine (gate): the rest queue behind it
        rest = [asyncio.ensure_future(h.infer(tensors.encode_request("m", {"x": x}, wanted), 10))
                for x, wanted in zip(xs[1:], (["y"], ["s"], None, ["s", "y"]))]
        odd = asyncio.ensure_future(h.infer(tensors.encode_request("m", {"x": other}, None), 10))
        bad = asyncio.ensure_future(h.infer(b"\xff\xff\xff", 10))
        big = asyncio.ensure_future(h.infer(tensors.encode_request("m", {"x": np.ones((9, 3), np.float32)}, None), 10))
        await until(lambda: server.calls.qsize() == 7)
        engine.gate.set()
        answers = [decode(await t) for t in [first, *rest, odd]]
        errors = []
        for t in (bad, big):
            with pytest.raises(WorkerStatus) as caught:
                await t
            errors.append((caught.value.code, caught.value.message))
        h.close()
        return answers, errors
    answers, errors = asyncio.run(main())
    server.stop()
    wanted = [None, ["y"], ["s"], None, ["s", "y"], None]
    for x, got, names in zip([*xs, other], answers, wanted):
        assert sorted(got) == sorted(names or ["y", "s"])
        if "y" in got:
            np.testing.assert_array_equal(got["y"], x * 2)
        if "s" in got:
            np.testing.assert_array_equal(got["s"], x.sum(axis=1))
    # The first alone (it was running), then the four queued width-3 calls as one of 8 rows, then
    # width 5 alone; the malformed and the too-large ones never reach the engine.
    assert engine.shapes == [(1, 3), (8, 3), (2, 5)]
    assert executions == [1, 8, 2]
    assert errors[0][0] == hop.INVALID_ARGUMENT and errors[0][1].startswith("malformed ModelInferRequest")
    assert errors[1] == (hop.INVALID_ARGUMENT, "a batch of 9 rows is more than the model's max_batch_size 8")


def test_large_calls_in_one_batch_each_answer_in_their_own_response_arena():
    """Requests above INLINE_MAX come with response arenas: a batch's members each get their own rows
    written into their own arena, and the batch's EXECUTION still follows the arena's size."""
    from sealbox.daemon.worker_hop import ArenaBody
    engine = Rows()
    server, path = serve(engine, Batching(8, 0))
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((n, 8192)).astype(np.float32) for n in (1, 3, 2)]   # 32 KiB per row
    executions = []

    async def main():
        h = WorkerHop(path, 2**26)
        h.on_execution = lambda rows, ns: executions.append(rows)
        first = asyncio.ensure_future(h.infer(tensors.encode_request("m", {"x": xs[0]}, None), 10))
        await until(lambda: engine.shapes)
        rest = [asyncio.ensure_future(h.infer(tensors.encode_request("m", {"x": x}, None), 10)) for x in xs[1:]]
        await until(lambda: server.calls.qsize() == 2)
        engine.gate.set()
        bodies = [await t for t in (first, *rest)]
        kinds = [isinstance(b, ArenaBody) for b in bodies]
        answers = [decode(b) for b in bodies]
        h.close()
        return kinds, answers
    kinds, answers = asyncio.run(main())
    server.stop()
    assert kinds == [False, True, True]   # the first (32 KiB) is inline; the two others in their arenas
    for x, got in zip(xs, answers):
        np.testing.assert_array_equal(got["y"], x * 2)
        np.testing.assert_array_equal(got["s"], x.sum(axis=1))
    assert engine.shapes == [(1, 8192), (5, 8192)] and executions == [1, 5]


def test_a_failing_batch_fails_each_member_with_the_same_error():
    class Broken(Rows):
        def infer(self, inputs):
            self.shapes.append(inputs["x"].shape)
            self.gate.wait(10)
            return {"y": inputs["x"][:1], "s": inputs["x"].sum(axis=1)}   # lost rows: cannot be split
    engine = Broken()
    server, path = serve(engine, Batching(4, 0))

    async def main():
        h = WorkerHop(path, 2**26)
        x = np.ones((1, 2), np.float32)
        calls = [asyncio.ensure_future(h.infer(tensors.encode_request("m", {"x": x}, None), 10))]
        await until(lambda: engine.shapes)   # the first holds the engine; the next two queue and join
        calls += [asyncio.ensure_future(h.infer(tensors.encode_request("m", {"x": x}, None), 10)) for _ in range(2)]
        await until(lambda: server.calls.qsize() == 2)
        engine.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        h.close()
        return results
    results = asyncio.run(main())
    server.stop()
    assert engine.shapes == [(1, 2), (2, 2)]
    np.testing.assert_array_equal(decode(results[0])["y"], np.ones((1, 2), np.float32))   # alone: whole
    assert all(isinstance(r, WorkerStatus) and r.code == hop.INTERNAL for r in results[1:])
    assert results[1].message == results[2].message == "output 'y' has shape [1, 2] for a batch of 2 rows"


def test_check_batchable_names_the_tensor():
    class Fixed(Rows):
        outputs = (TensorSpec("y", "FP32", (-1, -1)), TensorSpec("s", "FP32", (3,)))
    with pytest.raises(ModelError, match=r"output 's' has shape \[3\]"):
        batching.check_batchable(Fixed(), 4)
    batching.check_batchable(Rows(), 4)
    with pytest.raises(InferenceError):
        batching.split({"y": np.zeros(())}, [1])
