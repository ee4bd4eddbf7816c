"""The framed hop (proto/hop.py) end to end, through a real sealboxd and real sandboxed workers."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from tests.daemon.test_containment import SIMPLE_META, _quadratic, mlx_model
from tests.support.models import reference
from tests.support.pki import upstream_sign


def hop_memfds(pid: int) -> list[str]:
    """The hop's memfds (proto/hop.body_memfd names them) the daemon holds open."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "sealbox-hop" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                found.append(fd)
        except OSError:
            pass
    return found


def python_worker(daemon) -> int:
    import psutil
    for pid in daemon.worker_pids():
        if "sealbox.worker.main" in " ".join(psutil.Process(pid).cmdline()) and "bwrap" not in psutil.Process(pid).name():
            return pid
    raise AssertionError("no worker process")


def assert_killed_mid_call(call, name: str) -> None:
    """`call` (a future of client.infer) failed UNAVAILABLE because its worker was SIGKILLed: the watcher's
    reason ("... while serving") or, if the hop saw the death first, the exit itself."""
    with pytest.raises(grpc.RpcError) as err:
        call.result(timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() in (f"model '{name}' is unavailable: worker killed by SIGKILL while serving",
                                   f"model '{name}' is unavailable: worker killed by SIGKILL")


def wait_until_exact(client, name: str, x: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """The killed worker is restarted from the same sealed copies: UNAVAILABLE meanwhile, then the exact
    answer (within 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            np.testing.assert_allclose(client.infer(name, {"x": x})["y"], expected, rtol=rtol)
            return
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("rows", [4000, 8192])   # a 62.5 KiB request inline, a 128 KiB one in a memfd
def test_worker_killed_mid_call_is_unavailable_with_the_reason(tmp_path, daemon_factory, keys, rows):
    import mlx.core as mx
    model = mlx_model(tmp_path / "models" / "quad", SIMPLE_META, function=_quadratic, example=mx.zeros((2, 4)))
    upstream_sign(model, keys[0])
    daemon = daemon_factory({"quad": {"path": model}}, keys[1]).start()
    with daemon.client() as client:
        small = np.full((1, 4), 0.5, np.float32)
        expected = client.infer("quad", {"x": small})["y"]
        pool = concurrent.futures.ThreadPoolExecutor(1)
        call = pool.submit(client.infer, "quad", {"x": np.ones((rows, 4), np.float32)})
        time.sleep(1.5)   # at the worker, computing (minutes at these sizes)
        assert not call.done()
        os.kill(python_worker(daemon), signal.SIGKILL)
        assert_killed_mid_call(call, "quad")
        assert hop_memfds(daemon.proc.pid) == []
        wait_until_exact(client, "quad", small, expected, rtol=1e-6)
    assert hop_memfds(daemon.proc.pid) == []


def test_concurrent_calls_pipelined_and_exact(daemon_factory, demo_model, keys):
    """More calls than model_inflight (2) + model_queue (4) would allow at once are sent by 6 threads
    in a loop: every answer is the exact one for its own input, small and memfd-sized alike."""
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1]).start()
    failures = []

    def worker(seed: int):
        rng = np.random.default_rng(seed)
        with daemon.client() as client:
            for i in range(12):
                rows = int(rng.choice([1, 3, 5000]))   # 5000 x 4 x 4 B = 80 KiB: a memfd each way
                x = rng.standard_normal((rows, 4)).astype(np.float32)
                y = client.infer("demo", {"x": x})["y"]
                if not np.allclose(y, reference(x), rtol=1e-5, atol=1e-5):
                    failures.append((seed, i))
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert hop_memfds(daemon.proc.pid) == []
