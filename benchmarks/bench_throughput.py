"""64-client throughput with 1 and 2 instances and with dynamic batching, against one instance
without batching (today's default) and against the daemon as it was when issue 11 was filed (rebuilt
from git history: filing_time.py), and tiny-model load to READY from the warm pool against a cold
spawn; all measured in the same run, interleaved, medians.

    python -m benchmarks.bench_throughput            (BENCH_SECONDS=5 per window, BENCH_ROUNDS=3)
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import threading
import time

import numpy as np

from . import filing_time
from .common import DemoDaemon

CLIENTS = 64
PROCESSES = 4   # the clients' own Python must not be the bottleneck: 4 processes x 16 threads
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
LIMITS = "[server.limits]\ninference_rpcs = 128\nmodel_queue = 100\nper_caller_rpcs = 128\n"

CONFIGS = {   # model name -> per-model options
    "one": "",
    "two": "instances = 2",
    "batched": "max_batch_size = 64\nmax_queue_delay_us = 2000",
    "two_batched": "instances = 2\nmax_batch_size = 64\nmax_queue_delay_us = 2000",
}


def _client_process(target: str, model: str, threads: int, seconds: float, start, queue) -> None:
    import grpc
    from sealbox.proto import tensors
    x = np.random.default_rng(os.getpid()).standard_normal((1, 4)).astype(np.float32)
    request = tensors.encode_request(model, {"x": x}, None)
    counts, errors, seen = [0] * threads, [0] * threads, set()
    ready = threading.Barrier(threads + 1)
    go = threading.Event()

    def run(i):
        # Its own connection (grpc shares one per target otherwise, and [server.limits]
        # max_streams_per_connection would cap the process's calls in flight).
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=None, response_deserializer=None)
            try:
                infer(request, timeout=60)   # connected before the window opens
            except Exception as exc:
                seen.add(repr(exc)[:200])
            ready.wait()
            go.wait()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                try:
                    infer(request, timeout=60)
                    counts[i] += 1
                except Exception as exc:
                    errors[i] += 1
                    seen.add(repr(exc)[:200])
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    ready.wait()
    start.wait()   # every process's clients connected: the window opens for all at once
    cpu = time.process_time()
    go.set()
    for w in workers:
        w.join()
    queue.put((sum(counts), sum(errors), sorted(seen)[:3], time.process_time() - cpu))


def calls_per_second(target: str, model: str) -> tuple[float, int, float]:
    """Calls per second, failed calls, and the clients' own CPU seconds in the window."""
    ctx = multiprocessing.get_context("spawn")
    start, queue = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(target, model, CLIENTS // PROCESSES, SECONDS, start, queue))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=SECONDS + 300) for _ in procs]
    for p in procs:
        p.join()
    for _calls, _errors, seen, _cpu_s in results:
        for text in seen:
            print(f"  ({model}: {text})")
    return sum(r[0] for r in results) / SECONDS, sum(r[1] for r in results), sum(r[3] for r in results)


def _cpu(daemon) -> tuple[float, float]:
    """CPU seconds (user + system) so far of the supervisor and of all its workers."""
    import psutil
    main = psutil.Process(daemon.proc.pid)
    workers = 0.0
    for child in main.children(recursive=True):
        try:
            t = child.cpu_times()
            workers += t.user + t.system
        except psutil.Error:
            pass
    t = main.cpu_times()
    return t.user + t.system, workers


def throughput() -> None:
    import pathlib
    from tests.support import wait_for
    from tests.support.daemon import Daemon
    demo = DemoDaemon()   # builds and signs the demo model (not started): served below under four names
    model_dir = os.path.join(demo.dir, "model")
    daemon = Daemon(pathlib.Path(demo.dir), {name: {"path": model_dir, "options": opts} for name, opts in CONFIGS.items()},
                    pathlib.Path(demo.dir) / "keys" / "demo-signer.pub", extra=LIMITS)
    daemon.start()
    missing = filing_time.unavailable()
    filed = contextlib.nullcontext() if missing else filing_time.FilingTimeDaemon()
    try:
        from sealbox.client import Client
        with Client(daemon.target, admin_target=daemon.admin_target) as client:
            wait_for(lambda: all(m.state == "READY" for m in client.models()), what="every model READY")
        with filed as filed_target:
            if filed_target:   # the same demo model (its builder is deterministic): the same answer
                x = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)
                with Client(filed_target) as old_client, Client(daemon.target) as client:
                    assert np.array_equal(old_client.infer("demo", {"x": x})["y"], client.infer("one", {"x": x})["y"])
            samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
            old_samples: list[float] = []
            failures = {name: 0 for name in CONFIGS}
            cpu: dict[str, list[tuple[float, float, float]]] = {name: [] for name in CONFIGS}   # (supervisor, workers, clients) s/call
            for i in range(ROUNDS):
                if filed_target and i % 2 == 0:
                    old_samples.append(calls_per_second(filed_target, "demo")[0])
                for name in CONFIGS:
                    before = _cpu(daemon)
                    rate, errors, clients_cpu = calls_per_second(daemon.target, name)
                    after = _cpu(daemon)
                    samples[name].append(rate)
                    failures[name] += errors
                    calls = max(1.0, rate * SECONDS)
                    cpu[name].append(((after[0] - before[0]) / calls, (after[1] - before[1]) / calls, clients_cpu / calls))
                if filed_target and i % 2 == 1:
                    old_samples.append(calls_per_second(filed_target, "demo")[0])
        base = statistics.median(samples["one"])
        print(f"{CLIENTS} clients ({PROCESSES} processes), demo MLP batch 1, {SECONDS:g} s windows, "
              f"median of {ROUNDS} interleaved rounds:")
        for name, opts in CONFIGS.items():
            rate = statistics.median(samples[name])
            sup = statistics.median(c[0] for c in cpu[name]) * 1e6
            work = statistics.median(c[1] for c in cpu[name]) * 1e6
            clients = statistics.median(c[2] for c in cpu[name]) * 1e6
            print(f"  {name:12s} {rate:8.0f} calls/s  {rate / base:5.2f}x one instance   CPU per call: supervisor "
                  f"{sup:4.0f} us, workers {work:4.0f} us, the clients themselves {clients:4.0f} us   "
                  f"({opts.replace(chr(10), ', ') or 'instances = 1, no batching'}; failed calls {failures[name]})")
        if missing:
            print(f"  (no filing-time baseline: {missing})")
        else:
            old = statistics.median(old_samples)
            print(f"  the daemon when issue 11 was filed ({filing_time.FILING_COMMIT}, one instance, the same demo "
                  f"model): {old:.0f} calls/s; batched {statistics.median(samples['batched']) / old:.2f}x, two "
                  f"instances batched {statistics.median(samples['two_batched']) / old:.2f}x, one instance "
                  f"{base / old:.2f}x of it (goal: >= 3x with batching)")
    finally:
        daemon.stop()


def load_to_ready() -> None:
    """Tiny model (the demo MLP): load request to READY from the warm pool, with early start (the
    default: the worker starts while the model is verified) and spawning after verification."""
    import pathlib
    from sealbox.client import Client
    from tests.support import wait_for
    from tests.support.daemon import Daemon
    demo = DemoDaemon()   # builds and signs the demo model (not started)
    root, key = pathlib.Path(demo.dir), pathlib.Path(demo.dir) / "keys" / "demo-signer.pub"
    models = {"tiny": {"path": root / "model", "load": False}}
    kinds = {"pool": "warm_pool = 1", "early": "", "spawn": "early_start = false"}
    daemons = {}
    for name, workers in kinds.items():
        (root / name).mkdir()
        daemons[name] = Daemon(root / name, models, key, workers=workers).start()
    times: dict[str, list[float]] = {name: [] for name in kinds}
    try:
        for _ in range(max(ROUNDS, 5)):
            for name, daemon in daemons.items():
                with Client(daemon.target, admin_target=daemon.admin_target) as client:
                    # Before every measurement, not only the pool's: the pool's refill (a worker started
                    # after each take) must not compete for the two cores with another daemon's load.
                    pool_dir = daemons["pool"].run_dir
                    wait_for(lambda: any("-pool-" in n and os.path.exists(os.path.join(pool_dir, n, "worker.sock"))
                                         for n in os.listdir(pool_dir)), what="a listening pool worker")
                    time.sleep(0.2)   # its start-up's tail (warm-up imports) is over
                    t = time.perf_counter()
                    client.load("tiny")
                    times[name].append(time.perf_counter() - t)
                    client.infer("tiny", {"x": np.ones((2, 4), np.float32)})
                    client.unload("tiny")
                paths = [e["path"] for e in daemon.audit_events() if e["event"] == "model_load" and e.get("verdict") == "ready"]
                assert paths[-1] == name, paths   # the load took the path measured
    finally:
        for daemon in daemons.values():
            daemon.stop()
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"tiny model load to READY (verify + hand-over + deserialize + warm-up), median of {len(times['pool'])}: "
          f"warm pool {median['pool'] * 1000:.0f} ms, early start {median['early'] * 1000:.0f} ms, spawning after "
          f"verifying {median['spawn'] * 1000:.0f} ms (pool {median['pool'] / median['spawn']:.2f}x, early start "
          f"{median['early'] / median['spawn']:.2f}x of spawning after)")


if __name__ == "__main__":
    throughput()
    load_to_ready()
