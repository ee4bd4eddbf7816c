"""Serving: ModelInfer latency and large-tensor throughput through sealbox (client ->
supervisor -> sandboxed worker) against the same MLX function in-process, and
spawn-to-ready of a sandboxed worker against an unsandboxed one."""
from __future__ import annotations

import dataclasses
import os
import subprocess
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


def spawn_to_ready(daemon: DemoDaemon, rounds: int = 15) -> None:
    """Launch the demo worker directly: sandboxed (bwrap + configured layers) and bare, same fds."""
    import grpc
    from sealbox.daemon.config import load_config
    from sealbox.trust import verify_model
    from sealbox.sandbox import launcher
    from sealbox.daemon.supervisor import Supervisor
    from sealbox.daemon.worker_hop import WORKER_RECONNECT
    from sealbox.daemon.audit import AuditLog

    config = load_config(daemon.config)
    supervisor = Supervisor(config, AuditLog())
    model = config.models["demo"]
    profile = supervisor.profile_for(model)
    verified = verify_model("demo", model.path, model.policy, None, None)
    run_dir = "/run/sealbox/bench"

    def wait(proc, sock):
        channel = grpc.insecure_channel(f"unix:{sock}", options=WORKER_RECONNECT)
        describe = channel.unary_unary("/sealbox.worker.Worker/Describe", request_serializer=lambda x: x,
                                       response_deserializer=lambda x: x)
        describe(b"", wait_for_ready=True, timeout=60)
        channel.close()

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
    with DemoDaemon(os.environ.get("BENCH_WORKERS", "")) as daemon:
        latency_and_throughput(daemon)
        spawn_to_ready(daemon)
