"""Dynamic batching inside the worker: concurrent requests joined into one engine call and split
back exactly; what does not fit runs alone; ModelConfig and ModelStatistics tell Triton's truth."""
from __future__ import annotations

import json
import os
import pathlib
import threading

import grpc
import numpy as np
import pytest

from sealbox.proto import inference_pb2 as pb
from tests.support.pki import upstream_sign

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")

LIMITS = "[server.limits]\ninference_rpcs = 64\nmodel_queue = 40\nper_caller_rpcs = 64\nmodel_inflight_mb = 512\n"


def two_outputs(directory: pathlib.Path, out_shape=(-1, -1)) -> pathlib.Path:
    """x: FP32 [-1, -1] -> double = 2x + 1 (out_shape), rowsum = sum over axis 1 [-1, 1]."""
    import mlx.core as mx
    directory.mkdir()
    mx.export_function(str(directory / "model.mlxfn"), lambda x: (x * 2 + 1, mx.sum(x, axis=1, keepdims=True)),
                       mx.zeros((2, 4)), shapeless=True)
    (directory / "model.json").write_text(json.dumps({
        "function": "model.mlxfn",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "double", "datatype": "FP32", "shape": list(out_shape)},
                    {"name": "rowsum", "datatype": "FP32", "shape": [-1, 1]}]}))
    return directory


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    """The same function, in this process, one request at a time."""
    import mlx.core as mx
    a = mx.array(x)
    return {"double": np.array(a * 2 + 1), "rowsum": np.array(mx.sum(a, axis=1, keepdims=True))}


@pytest.fixture(scope="module")
def batching(tmp_path_factory, keys):
    from tests.support.daemon import Daemon
    models = tmp_path_factory.mktemp("batching-models")
    good = two_outputs(models / "batched")
    upstream_sign(good, keys[0])
    fixed = two_outputs(models / "fixed", out_shape=(2, -1))
    upstream_sign(fixed, keys[0])
    daemon = Daemon(tmp_path_factory.mktemp("batching-daemon"), {
        "batched": {"path": good, "options": "max_batch_size = 16\nmax_queue_delay_us = 50000"},
        "plain": {"path": good},
        "fixed": {"path": fixed, "options": "max_batch_size = 4"},
    }, keys[1], extra=LIMITS).start()
    yield daemon
    daemon.stop()


def stub(daemon, admin=False):
    from sealbox.proto import inference_pb2_grpc
    channel = grpc.insecure_channel(daemon.admin_target if admin else daemon.target)
    return channel, inference_pb2_grpc.GRPCInferenceServiceStub(channel)


def statistics(daemon, name: str):
    channel, s = stub(daemon, admin=True)
    with channel:
        return s.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=10).model_stats[0]


def test_model_without_a_batch_dimension_is_refused_naming_the_tensor(batching):
    with batching.client() as client:
        status = client.status("fixed")
    assert status.state == "UNAVAILABLE"
    assert status.reason.endswith("model refused: dynamic batching (max_batch_size 4) needs -1 as the first "
                                  "dimension of every input and output: output 'double' has shape [2, -1]"), status.reason
    assert not [e for e in batching.audit_events() if e["event"] == "model_load" and e["model"] == "fixed"
                and e["verdict"] == "ready"]


def test_model_config_reports_batching_as_triton_does(batching):
    channel, s = stub(batching)
    with channel:
        batched = s.ModelConfig(pb.ModelConfigRequest(name="batched"), timeout=10).config
        plain = s.ModelConfig(pb.ModelConfigRequest(name="plain"), timeout=10).config
    assert batched.max_batch_size == 16
    assert [list(t.dims) for t in batched.input] == [[-1]]        # the batch dimension left out
    assert [(t.name, list(t.dims)) for t in batched.output] == [("double", [-1]), ("rowsum", [1])]
    assert batched.dynamic_batching.max_queue_delay_microseconds == 50000
    assert batched.dynamic_batching.preserve_ordering
    assert list(batched.dynamic_batching.preferred_batch_size) == []
    assert plain.max_batch_size == 0 and not plain.HasField("dynamic_batching")
    assert [list(t.dims) for t in plain.input] == [[-1, -1]]


def test_concurrent_requests_each_get_exactly_their_own_rows(batching):
    rng = np.random.default_rng(5)
    # (rows, width, outputs asked for): mixed batch sizes, two widths (a width-6 request cannot join
    # width-4 ones: it runs alone, or with other width-6 ones), different requested outputs, and one
    # request larger than max_batch_size (refused, as Triton does; the others are unaffected).
    plan = [(1 + i % 4, 4, [["double"], ["rowsum"], None][i % 3]) for i in range(14)]
    plan += [(2, 6, None), (3, 6, ["rowsum"]), (17, 4, None)]
    inputs = [rng.standard_normal((rows, width)).astype(np.float32) for rows, width, _ in plan]
    results: dict[int, object] = {}
    before = statistics(batching, "batched")
    start = threading.Barrier(len(plan))

    def call(i):
        with batching.client() as client:
            start.wait()
            try:
                results[i] = client.infer("batched", {"x": inputs[i]}, outputs=plan[i][2])
            except grpc.RpcError as exc:
                results[i] = exc
    for _round in range(3):
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(plan))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        start.reset()
        for i, (rows, width, wanted) in enumerate(plan):
            got = results[i]
            if rows > 16:
                assert isinstance(got, grpc.RpcError) and got.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert got.details() == "a batch of 17 rows is more than the model's max_batch_size 16"
                continue
            assert not isinstance(got, Exception), got
            want = expected(inputs[i])
            assert sorted(got) == sorted(wanted or want), (i, sorted(got))
            for name in got:
                assert got[name].shape == want[name].shape
                np.testing.assert_array_equal(got[name], want[name])   # bit for bit
    after = statistics(batching, "batched")
    requests = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert requests == 3 * (len(plan) - 1)
    assert executions < requests                 # requests were joined
    sizes = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    assert sum(sizes.values()) == after.execution_count
    assert max(sizes) > 4                        # a joined batch larger than any single request
    assert all(size <= 16 for size in sizes)


def test_unbatched_model_counts_one_execution_per_request(batching):
    x = np.ones((3, 4), np.float32)
    with batching.client() as client:
        for _ in range(3):
            np.testing.assert_array_equal(client.infer("plain", {"x": x})["double"], expected(x)["double"])
    stats = statistics(batching, "plain")
    assert stats.execution_count == stats.inference_count >= 3
    assert [b.batch_size for b in stats.batch_stats] == [1]


def _slow_square(x):
    """x [rows, 64] -> [rows, 64]; rows x rows matrix powers: ~0.02 s at 1 row, many seconds at 600."""
    g = x @ x.T
    for _ in range(1500):
        g = g @ g / 600.0
    return g @ x


@pytest.mark.slow
def test_a_worker_killed_mid_batch_fails_every_member_and_leaks_nothing(tmp_path, daemon_factory, keys):
    """Four requests joined into one engine call (one of them memfd-sized), the worker SIGKILLed while it
    computes: every caller gets UNAVAILABLE with the reason, the supervisor holds no hop memfd, and the
    restarted worker answers exactly again."""
    import concurrent.futures
    import signal
    import time

    import mlx.core as mx
    from tests.daemon.test_containment import mlx_model
    from tests.daemon.test_hop_daemon import assert_killed_mid_call, hop_memfds, python_worker, wait_until_exact

    spec = {"datatype": "FP32", "shape": [-1, 64]}
    meta = {"function": "model.mlxfn", "inputs": [dict(spec, name="x")], "outputs": [dict(spec, name="y")]}
    model = mlx_model(tmp_path / "models" / "square", meta, function=_slow_square, example=mx.zeros((2, 64)))
    upstream_sign(model, keys[0])
    daemon = daemon_factory({"square": {"path": model, "options": "max_batch_size = 1024\nmax_queue_delay_us = 500000"}},
                            keys[1], extra=LIMITS).start()
    with daemon.client() as client:
        small = np.full((1, 64), 0.01, np.float32)
        expected_small = client.infer("square", {"x": small})["y"]
        pool = concurrent.futures.ThreadPoolExecutor(4)
        # 300 rows = 75 KiB: that request crosses as a memfd; the joined batch (600 rows) takes many seconds
        sizes = [300, 100, 100, 100]
        calls = [pool.submit(client.infer, "square", {"x": np.full((rows, 64), 0.01, np.float32)}) for rows in sizes]
        time.sleep(2.0)   # joined within max_queue_delay_us, computing
        assert not any(c.done() for c in calls)
        os.kill(python_worker(daemon), signal.SIGKILL)
        for call in calls:
            assert_killed_mid_call(call, "square")
        assert hop_memfds(daemon.proc.pid) == []
        failed = statistics(daemon, "square").inference_stats
        assert (failed.success.count, failed.fail.count) == (1, 4)   # the first small call; the four
        wait_until_exact(client, "square", small, expected_small, rtol=1e-5)
        pool.shutdown()
    assert hop_memfds(daemon.proc.pid) == []
