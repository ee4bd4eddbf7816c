"""Serving: ModelInfer latency and large-tensor throughput through sealbox (client ->
supervisor -> sandboxed worker) against the same MLX function in-process and against a
minimal in-process Python gRPC ModelInfer server (benchmarks/minimal_server.py, the floor for
Python gRPC) driven by stock tritonclient in the same run, and spawn-to-ready of a sandboxed
worker against an unsandboxed one."""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks.common import DemoDaemon, ms, stats, timed

CALLS = int(os.environ.get("BENCH_CALLS", "500"))


def in_process_fn(model_dir: str):
    import mlx.core as mx
    weights = mx.load(os.path.join(model_dir, "weights.safetensors"))
    fn = mx.import_function(os.path.join(model_dir, "model.mlxfn"))

    def call(x: np.ndarray) -> np.ndarray:
        out = fn(mx.array(x), **weights)[0]
        mx.eval(out)
        return np.array(out, copy=False)
    return call


def latency_and_throughput(daemon: DemoDaemon) -> None:
    from sealbox.client import Client
    local = in_process_fn(os.path.join(daemon.dir, "model"))
    small = np.ones((1, 4), np.float32)
    big = np.random.default_rng(0).standard_normal((4 * 2**20, 4)).astype(np.float32)  # 64 MiB in
    with Client(daemon.target) as client:
        for _ in range(50):
            client.infer("demo", {"x": small})
            local(small)
        remote = stats(timed(lambda: client.infer("demo", {"x": small}), CALLS))
        base = stats(timed(lambda: local(small), CALLS))
        print(f"small call (batch 1)   sealbox median {ms(remote['median'])} p99 {ms(remote['p99'])}   "
              f"in-process median {ms(base['median'])} p99 {ms(base['p99'])}   "
              f"ratio {remote['median'] / base['median']:.1f}x  (+{ms(remote['median'] - base['median'])})")
        # Throughput: the echo model returns its input, so this measures moving 64 MiB in and out.
        import mlx.core as mx
        echo = mx.import_function(os.path.join(daemon.dir, "echo", "model.mlxfn"))

        def local_echo(x):
            out = echo(mx.array(x))[0]
            mx.eval(out)
            return np.array(out, copy=False)
        client.infer("echo", {"x": big})
        remote = stats(timed(lambda: client.infer("echo", {"x": big}), 9))
        base = stats(timed(lambda: local_echo(big), 9))
        gb = big.nbytes / 1e9
        print(f"64 MiB input (echo)    sealbox median {ms(remote['median'])} = {gb / remote['median']:.2f} GB/s   "
              f"in-process {ms(base['median'])} = {gb / base['median']:.2f} GB/s   "
              f"ratio {remote['median'] / base['median']:.2f}x")


def _cpu(processes) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:   # a process that ended
            pass
    return total


def _load(target: str, mode: str, n: int, threads: int = 8) -> dict:
    """benchmarks/triton_load.py in its own process (stock tritonclient)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.triton_load", target, "echo", mode, str(n), str(threads)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"triton_load {target} {mode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def against_minimal_server(daemon: DemoDaemon, rounds: int = 3) -> None:
    """sealbox against the minimal in-process gRPC server, interleaved, same client (tritonclient), same
    MLX function (the echo model): small-call latency and CPU per call (supervisor + worker processes
    against the server process), 8-thread calls/s, 64 MiB round trips and each side's peak RSS.
    A third peer, a grpc.aio server answering without computing, is the floor of the supervisor's
    own part (a grpc.aio front door) in the small-call figures."""
    import psutil
    tmp = tempfile.mkdtemp(prefix="sealbox-minimal-")
    servers = {}
    try:
        for name, extra in (("minimal", []), ("aio", ["--aio-fixed"]), ("aio_echo", ["--aio-echo"]),
                            ("door_echo", ["--front-door-echo"])):
            sock = os.path.join(tmp, f"{name}.sock")
            servers[name] = (subprocess.Popen([sys.executable, "-m", "benchmarks.minimal_server", sock,
                                               os.path.join(daemon.dir, "echo"), *extra], stdout=subprocess.PIPE),
                             f"unix:{sock}")
            assert servers[name][0].stdout.readline().strip() == b"ready"
        supervisor = psutil.Process(daemon.daemon.proc.pid)
        sides = {"sealbox": (daemon.target, lambda: [supervisor]),
                 "workers": (None, lambda: supervisor.children(recursive=True)),
                 **{name: (target, lambda p=proc: [psutil.Process(p.pid)]) for name, (proc, target) in servers.items()}}
        small = {k: [] for k in sides}
        cpu = {k: 0.0 for k in sides}
        per_second = {k: [] for k in sides}
        big = {k: [] for k in sides}
        for _ in range(rounds):
            for name, (target, procs) in sides.items():
                if target is None or name.endswith("_echo"):   # the echo servers are for 64 MiB only
                    continue
                measured = [name, "workers"] if name == "sealbox" else [name]
                before = {k: _cpu(sides[k][1]()) for k in measured}
                run = _load(target, "small", CALLS)
                for k in measured:
                    cpu[k] += (_cpu(sides[k][1]()) - before[k]) / (CALLS + 20)
                small[name] += run["samples"]
                run = _load(target, "threads", CALLS // 5)
                per_second[name].append(run["calls"] / run["elapsed"])
        sampling, samples = threading.Event(), {}

        def sample(process, into):
            while not sampling.is_set():
                m = process.memory_full_info()   # rss counts the worker's memfd pages while mapped
                into.append((m.rss, m.uss))
                time.sleep(0.002)
        peak = {}
        shared = []
        for _ in range(rounds):   # interleaved, like the small calls: the machine's load drifts
            run = _load(daemon.target, "shm", 3)   # sealbox only: the minimal server has no shared memory
            shared += [run["bytes"] / t / 2**20 for t in run["samples"]]
            for name in ("sealbox", "minimal", "aio", "aio_echo", "door_echo"):
                target, procs = sides[name]
                # the grpc.aio server answers without computing: it only receives the 64 MiB request
                mode = "send" if name == "aio" else "big"
                if name != "aio":   # throughput without the sampler: reading smaps every 2 ms costs the
                    # measured server (page-table walks under its mmap lock), the more the more it maps
                    run = _load(target, mode, 3)
                    big[name] += [run["bytes"] / t / 2**20 for t in run["samples"]]
                process = procs()[0]
                full = process.memory_full_info()
                into = samples.setdefault(name, [])
                sampling.clear()
                sampler = threading.Thread(target=sample, args=(process, into))
                sampler.start()
                run = _load(target, mode, 1)
                sampling.set()
                sampler.join()
                rss, uss = (max(s[0] for s in into) - full.rss) / run["bytes"], (max(s[1] for s in into) - full.uss) / run["bytes"]
                old = peak.get(name, (0, 0))
                peak[name] = (max(old[0], rss), max(old[1], uss))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()

    def p(samples, q):
        return sorted(samples)[min(len(samples) - 1, int(len(samples) * q))]
    sb, mn, fa = small["sealbox"], small["minimal"], small["aio"]
    print(f"small call (tritonclient, echo)   sealbox p50 {ms(p(sb, .5))} p99 {ms(p(sb, .99))}   "
          f"minimal server p50 {ms(p(mn, .5))} p99 {ms(p(mn, .99))}   "
          f"ratios p50 {p(sb, .5) / p(mn, .5):.2f}x p99 {p(sb, .99) / p(mn, .99):.2f}x (goal p50 <= 1.2x)   "
          f"grpc.aio answering without computing p50 {ms(p(fa, .5))}")
    us = {k: v / rounds * 1e6 for k, v in cpu.items()}
    both = us["sealbox"] + us["workers"]
    print(f"CPU per small call                sealbox {both:7.0f} us (supervisor {us['sealbox']:.0f} + worker "
          f"{us['workers']:.0f})   minimal server {us['minimal']:7.0f} us   ratio {both / us['minimal']:.2f}x "
          f"(goal <= 1.2x)   grpc.aio answering without computing {us['aio']:.0f} us: the supervisor at "
          f"{us['sealbox'] / us['aio']:.2f}x its floor")
    s8, m8 = statistics.median(per_second["sealbox"]), statistics.median(per_second["minimal"])
    print(f"8 client threads                  sealbox {s8:7.0f} calls/s   minimal server {m8:7.0f} calls/s   "
          f"ratio {s8 / m8:.2f}x   grpc.aio answering without computing {statistics.median(per_second['aio']):.0f} calls/s")
    sbig, mbig = statistics.median(big["sealbox"]), statistics.median(big["minimal"])
    aecho, decho = statistics.median(big["aio_echo"]), statistics.median(big["door_echo"])
    print(f"64 MiB round trip (echo)          sealbox {sbig:6.1f} MiB/s   minimal server {mbig:6.1f} MiB/s   "
          f"ratio {sbig / mbig:.2f}x (goal >= 0.9x)   grpc.aio echoing without MLX: unary {aecho:.1f} MiB/s "
          f"({aecho / mbig:.2f}x), shaped like the front door {decho:.1f} MiB/s ({decho / mbig:.2f}x; sealbox "
          f"{sbig / decho:.2f}x of it)")
    sshm = statistics.median(shared)
    print(f"64 MiB round trip, shared memory  sealbox {sshm:6.1f} MiB/s = {sshm * 2**20 / 1e9:.2f} GB/s "
          f"({sshm / mbig:.1f}x the minimal server over gRPC; goal >= 2 GB/s)")
    print(f"peak memory per in-flight 64 MiB call (above idle, in units of 64 MiB): sealbox's supervisor RSS "
          f"+{peak['sealbox'][0]:.2f}x, USS +{peak['sealbox'][1]:.2f}x (goal <= 1x)   minimal server RSS "
          f"+{peak['minimal'][0]:.2f}x, USS +{peak['minimal'][1]:.2f}x   grpc.aio receiving the 64 MiB request "
          f"alone RSS +{peak['aio'][0]:.2f}x, USS +{peak['aio'][1]:.2f}x   the front-door-shaped echo RSS "
          f"+{peak['door_echo'][0]:.2f}x")


def spawn_to_ready(daemon: DemoDaemon, rounds: int = 15) -> None:
    """Launch the demo worker directly: sandboxed (bwrap + configured layers) and bare, same fds."""
    from sealbox.daemon.config import load_config
    from sealbox.trust import verify_model
    from sealbox.sandbox import launcher
    from sealbox.daemon.supervisor import Supervisor
    from sealbox.daemon.worker_hop import describe
    from sealbox.daemon.audit import AuditLog

    config = load_config(daemon.config)
    supervisor = Supervisor(config, AuditLog())
    model = config.models["demo"]
    profile = supervisor.profile_for(model)
    verified = verify_model("demo", model.path, model.policy, None, None)
    run_dir = "/run/sealbox/bench"

    def wait(proc, sock):
        deadline = time.monotonic() + 60
        while True:
            try:
                describe(sock, 2**16, 60)
                return
            except OSError:   # not listening yet
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.002)

    def sandboxed(p):
        sock_dir = launcher.make_socket_dir(run_dir, "w", p)
        t = time.perf_counter()
        worker = supervisor.spawner.call(lambda: launcher.launch(p, sock_dir, verified.files,
                                                                 stderr=subprocess.DEVNULL))
        wait(worker.proc, os.path.join(sock_dir, "worker.sock"))
        elapsed = time.perf_counter() - t
        worker.stop()
        return elapsed

    def bare():
        sock_dir = launcher.make_socket_dir(run_dir, "b", profile)
        spec = launcher.worker_spec(profile, verified.files)
        spec = dataclasses.replace(spec, sandbox=dataclasses.replace(
            spec.sandbox, socket=f"{sock_dir}/worker.sock", landlock=False, seccomp_stage2_fd=None))
        t = time.perf_counter()
        proc = subprocess.Popen([profile.python, "-m", "sealbox.worker.main", spec.to_json()],
                                pass_fds=tuple(verified.files.values()), stderr=subprocess.DEVNULL)
        wait(proc, os.path.join(sock_dir, "worker.sock"))
        elapsed = time.perf_counter() - t
        proc.kill()
        proc.wait()
        return elapsed

    bwrap_only = dataclasses.replace(profile, seccomp=False, landlock=False, cgroups=False)
    sandboxed(profile), bare()  # warm the page cache
    full = stats([sandboxed(profile) for _ in range(rounds)])
    plain = stats([sandboxed(bwrap_only) for _ in range(rounds)])
    b = stats([bare() for _ in range(rounds)])
    layers = ", ".join(k for k in ("seccomp", "landlock", "cgroups") if getattr(profile, k)) or "none"
    print(f"spawn-to-ready         every layer (bwrap + {layers}) median {ms(full['median'])}   "
          f"bwrap alone {ms(plain['median'])}   no sandbox {ms(b['median'])}   "
          f"ratios {full['median'] / b['median']:.2f}x / {plain['median'] / b['median']:.2f}x of no sandbox")
    verified.close()


if __name__ == "__main__":
    # shared_memory_owners: the benchmark's own regions (it runs as root, as the daemon does).
    with DemoDaemon(os.environ.get("BENCH_WORKERS", ""), server="shared_memory_owners = [0]") as daemon:
        against_minimal_server(daemon)
        latency_and_throughput(daemon)
        spawn_to_ready(daemon)
