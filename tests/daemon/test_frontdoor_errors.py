"""Every error a client sees is sealbox-made: no transport text, path, pid or worker-authored code leaks.

Before: after a worker died, ~0.1 % of calls got raw transport text naming the host run directory,
the daemon's pid and restart count (`failed to connect to all addresses; ... unix:/run/sealbox/...
/worker.sock`), others `worker worker killed...` or `model 'A' is ready` as the reason of an
UNAVAILABLE; a hostile worker's own status codes and 7 kB messages reached clients unchanged.
"""
from __future__ import annotations

import asyncio
import random
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from tests.support.frontdoor import worker_tree
from sealbox.proto import inference_pb2 as pb

LEAKS = ("/", "unix:", "failed to connect", "addresses", "Socket", "socket", "errno", "Errno", "pid", "sock",
         "ready", "worker worker", "Traceback", "Exception")


def worker_python(daemon, model="demo"):
    for proc in worker_tree(daemon, model):
        try:
            if "sealbox.worker.main" in " ".join(proc.cmdline()) and proc.name().startswith("python"):
                return proc
        except Exception:
            continue
    return None


@pytest.mark.slow
def test_100_worker_kills_under_load_leak_nothing(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1])
    daemon.config.write_text(daemon.config.read_text().replace("restart_backoff_s = [0.2, 2]",
                                                               "restart_backoff_s = [0.05, 0.2]"))
    daemon.start()
    stop = threading.Event()
    seen: list[tuple[str, str]] = []
    calls = [0]
    x = np.ones((2, 4), np.float32)

    def load():
        with daemon.client() as client:
            while not stop.is_set():
                try:
                    client.infer("demo", {"x": x}, timeout=30)
                except grpc.RpcError as exc:
                    seen.append((exc.code().name, exc.details()))
                calls[0] += 1
    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    kills, rng = 0, random.Random(7)
    deadline = time.monotonic() + 600
    with daemon.client() as client:
        while kills < 100 and time.monotonic() < deadline:
            worker = worker_python(daemon)
            if worker is None or not client.model_ready("demo"):
                time.sleep(0.01)
                continue
            time.sleep(rng.uniform(0, 0.05))   # somewhere in the middle of the calls
            try:
                worker.send_signal(signal.SIGKILL)
                kills += 1
            except Exception:
                continue
            while client.model_ready("demo"):   # wait until the supervisor saw the death
                time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    codes = {code for code, _ in seen}
    print(f"\nMEASURED {kills} kills, {calls[0]} calls, {len(seen)} errors: "
          f"{sorted({d for _, d in seen})[:8]}")
    assert kills == 100
    assert codes <= {"UNAVAILABLE"}, codes
    leaked = [d for _, d in seen if any(word in d for word in LEAKS) or str(daemon.proc.pid) in d]
    assert leaked == []
    assert all(d.startswith("model 'demo' is unavailable: ") for _, d in seen)
    assert daemon.proc.poll() is None
    with daemon.client() as client:   # and it still serves
        deadline = time.monotonic() + 30
        while not client.model_ready("demo") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.infer("demo", {"x": x})["y"].shape == (2, 3)


# ---- a hostile worker, over the real hop ---------------------------------------------------------
def _hostile_worker_answers():
    """A hostile worker on a real hop socket answers every call with an ERROR record of a hostile
    status; the supervisor's real hop (WorkerHop) receives them and errors.py maps them."""
    import tempfile
    import threading
    from sealbox.daemon import errors
    from sealbox.daemon.supervisor import _status_code
    from sealbox.daemon.worker_hop import WorkerHop, WorkerStatus
    from sealbox.proto import hop

    hostile = [
        (grpc.StatusCode.INVALID_ARGUMENT, "input 'x' bad; see /run/sealbox/workers/123-demo-4/worker.sock pid 4242 "
         + "A" * 7000 + "\x1b[31m"),
        (grpc.StatusCode.PERMISSION_DENIED, "you are not root"),
        (grpc.StatusCode.UNAUTHENTICATED, "log in"),
        (grpc.StatusCode.INTERNAL, "failed to connect to all addresses; unix:/run/sealbox/x/worker.sock"),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed"),
        (grpc.StatusCode.OUT_OF_RANGE, "x" * 7000),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "/etc/shadow is large"),
    ]
    directory = tempfile.mkdtemp()
    listener = hop.listen(f"{directory}/worker.sock")

    def worker():
        conn, _ = listener.accept()
        for code, text in hostile:
            record = hop.recv(conn, 2**20, hop.TO_WORKER)
            hop.send_error(conn, record.call_id, code.value[0], text)
        conn.close()
    threading.Thread(target=worker, daemon=True).start()

    async def main():
        channel = WorkerHop(f"{directory}/worker.sock", 2**20)
        mapped = []
        for _ in hostile:
            try:
                await channel.infer(b"", timeout=10)
            except WorkerStatus as exc:
                error = errors.from_worker_status("demo", _status_code(exc.code), exc.message)
                mapped.append((error.code, error.message))
        channel.close()
        return mapped
    try:
        return asyncio.run(main())
    finally:
        listener.close()


def test_hostile_worker_statuses_are_mapped_and_truncated():
    mapped = _hostile_worker_answers()
    codes = [code.name for code, _ in mapped]
    assert codes == ["INVALID_ARGUMENT", "INTERNAL", "INTERNAL", "INTERNAL", "INTERNAL",
                     "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"]
    assert all(len(message) <= 200 for _, message in mapped)
    first = mapped[0][1]
    assert first.startswith("input 'x' bad; see <path> pid 4242 AAAA") and "/run" not in first
    # A worker's INTERNAL (the engine failed) and statuses it has no business sending: a fixed text.
    assert mapped[1][1] == mapped[2][1] == mapped[3][1] == mapped[4][1] == "model 'demo' failed"
    assert mapped[6][1] == "model 'demo': response exceeds the message limit"
    assert all(c.isprintable() for _, message in mapped for c in message)


def test_model_metadata_is_served_from_the_load(daemon_factory, demo_model, keys):
    """ModelMetadata is the bounded answer made once per load; unloaded, it is UNAVAILABLE with the reason."""
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1]).start()
    with daemon.client() as client:
        first = client.metadata("demo")
        assert client.metadata("demo") == first and first.name == "demo"
        client.unload("demo")
        with pytest.raises(grpc.RpcError) as err:
            client.metadata("demo")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "model 'demo' is unavailable: unloaded"
        with pytest.raises(grpc.RpcError) as err:
            client.stub.ModelMetadata(pb.ModelMetadataRequest(name="x" * 5000))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) < 100
