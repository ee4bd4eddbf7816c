"""Small-call latency through stock tritonclient (gRPC), for bench_mlserver: run as its own process,
because tritonclient's protobuf files and sealbox's both define the package `inference` and cannot
share one process's descriptor pool.

    python benchmarks/triton_caller.py CALLS BLOCK NAME=HOST:PORT ...   ->  JSON {NAME: [seconds, ...]}

Each server gets a warm-up, then blocks of BLOCK calls, alternating servers, until each made CALLS;
all answers must agree.
"""
import json
import sys
import time

import numpy as np
import tritonclient.grpc as tc


def caller(url: str):
    client = tc.InferenceServerClient(url)
    x = np.ones((1, 4), np.float32)

    def call() -> np.ndarray:
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("demo", [inp]).as_numpy("y")
    return call


def main() -> None:
    calls_wanted, block = int(sys.argv[1]), int(sys.argv[2])
    calls = dict(arg.split("=", 1) for arg in sys.argv[3:])
    calls = {name: caller(url) for name, url in calls.items()}
    answers = [call() for call in calls.values()]
    assert all(np.allclose(a, answers[0], atol=1e-5) for a in answers), f"the servers disagree: {answers}"
    samples = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(50):
            call()
    while min(len(s) for s in samples.values()) < calls_wanted:
        for name, call in calls.items():
            for _ in range(block):
                t = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t)
    json.dump(samples, sys.stdout)


if __name__ == "__main__":
    main()
