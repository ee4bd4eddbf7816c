"""A stock tritonclient[grpc] load driver, run in its own process (tritonclient's protobuf stubs clash with
sealbox's own): `python -m benchmarks.triton_load TARGET MODEL MODE N [THREADS]` prints JSON.

MODE small: N sequential calls with a (1, 4) FP32 input, per-call seconds.
MODE threads: THREADS threads making N calls each, total calls and elapsed seconds.
MODE big: N sequential round trips of a 64 MiB FP32 input (the echo model returns it), per-call seconds.
MODE send: N sequential calls sending the 64 MiB input, the answer not checked (for a server that
answers without computing: what receiving the request costs it), per-call seconds.
MODE shm: the same round trips with input and output in system shared memory (Triton's extension, as
tritonclient.utils.shared_memory uses it: one region per tensor, registered once), per-call seconds.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as tc


def call(client, model: str, x: np.ndarray) -> np.ndarray:
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("y")


def main(target: str, model: str, mode: str, n: int, threads: int = 8) -> dict:
    options = [("grpc.max_receive_message_length", 256 * 2**20), ("grpc.max_send_message_length", 256 * 2**20)]
    client = tc.InferenceServerClient(target, channel_args=options)
    small = np.ones((1, 4), np.float32)
    if mode == "small":
        for _ in range(20):
            call(client, model, small)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            call(client, model, small)
            samples.append(time.perf_counter() - t)
        return {"samples": samples}
    if mode == "threads":
        clients = [tc.InferenceServerClient(target, channel_args=options) for _ in range(threads)]
        for c in clients:
            call(c, model, small)
        start = time.perf_counter()
        workers = [threading.Thread(target=lambda c=c: [call(c, model, small) for _ in range(n)]) for c in clients]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return {"calls": n * threads, "elapsed": time.perf_counter() - start}
    big = np.random.default_rng(0).standard_normal((4 * 2**20, 4)).astype(np.float32)   # 64 MiB
    if mode == "shm":
        return shared_memory_round_trips(client, model, big, n)
    if mode == "send":
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            inp = tc.InferInput("x", list(big.shape), "FP32")
            inp.set_data_from_numpy(big)
            client.infer(model, [inp])
            samples.append(time.perf_counter() - t)
        return {"samples": samples, "bytes": big.nbytes}
    assert np.array_equal(call(client, model, big), big)
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        call(client, model, big)
        samples.append(time.perf_counter() - t)
    return {"samples": samples, "bytes": big.nbytes}


def shared_memory_round_trips(client, model: str, big: np.ndarray, n: int) -> dict:
    import tritonclient.utils.shared_memory as shm
    tag = f"bench-{os.getpid()}"
    regions = {side: shm.create_shared_memory_region(f"{tag}-{side}", f"/{tag}-{side}", big.nbytes)
               for side in ("in", "out")}
    try:
        for side in regions:
            client.register_system_shared_memory(f"{tag}-{side}", f"/{tag}-{side}", big.nbytes)

        def round_trip() -> None:
            # The client's own part of a call: its input written into the region, the output read back.
            shm.set_shared_memory_region(regions["in"], [big])
            inp = tc.InferInput("x", list(big.shape), "FP32")
            inp.set_shared_memory(f"{tag}-in", big.nbytes)
            out = tc.InferRequestedOutput("y")
            out.set_shared_memory(f"{tag}-out", big.nbytes)
            client.infer(model, [inp], outputs=[out])
            return shm.get_contents_as_numpy(regions["out"], np.float32, list(big.shape))
        assert np.array_equal(round_trip(), big)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            round_trip()
            samples.append(time.perf_counter() - t)
        client.unregister_system_shared_memory()
        return {"samples": samples, "bytes": big.nbytes}
    finally:
        for handle in regions.values():
            shm.destroy_shared_memory_region(handle)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(args[0], args[1], args[2], int(args[3]), *(int(a) for a in args[4:]))))
