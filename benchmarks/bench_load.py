"""A verified 1 GiB safetensors model to READY, against plain mx.load + mx.eval and the verify floor, with
the phase breakdown from each load's audit event, and the daemon's RSS across the reloads.

    python -m benchmarks.bench_load      (from the repository root; BENCH_LOAD_MB=1024, BENCH_ROUNDS=5)

The model (one dense layer, weights written by mx.save_safetensors) is signed with the upstream
`model_signing sign key`. Each round, interleaved: sealbox unloads and loads it through the admin socket
(RepositoryModelLoad: policy, storage checks, signature, hashing into sealed memfds, spawn, the strict
safetensors check, mx.load, warm-up) and reports READY; in this process, plain `mx.load` + `mx.eval` of
the same file; the verify floor, reading and SHA-256-hashing the model's files with one thread per
core (one file: one SHA-256 stream, which no verifier can split). Goal (issue 11): load-to-READY <=
1.5x (verify floor + plain mx.load).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import psutil

from benchmarks.common import DemoDaemon
from tests.support.models import build_mlp_model
from tests.support.pki import upstream_sign

SIZE_MB = int(os.environ.get("BENCH_LOAD_MB", "1024"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
PHASES = ("verify_s", "hash_s", "spawn_s", "worker_deserialize_s", "worker_warmup_s", "worker_load_s", "ready_s")


def plain_load(path: str) -> float:
    import mlx.core as mx
    t = time.perf_counter()
    weights = mx.load(path)
    mx.eval(list(weights.values()))
    elapsed = time.perf_counter() - t
    del weights
    return elapsed


def verify_floor(paths: list[str]) -> float:
    def one(path):
        with open(path, "rb") as f:
            hashlib.file_digest(f, "sha256")
    t = time.perf_counter()
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - t


def main() -> None:
    big = os.path.join(tempfile.mkdtemp(prefix="sealbox-bench-big-"), "big")
    os.chmod(os.path.dirname(big), 0o755)
    daemon = DemoDaemon("memory_mb = 4096", {"big": {"path": big, "load": False}})
    size = build_mlp_model(big, SIZE_MB)
    upstream_sign(pathlib.Path(big), daemon.private_key)
    path = os.path.join(big, "weights.safetensors")
    files = [os.path.join(big, n) for n in os.listdir(big) if n != "model.sig"]
    plain_load(path)  # page cache warm for all
    sealbox, plain, floor, events = [], [], [], []
    with daemon:
        proc = psutil.Process(daemon.daemon.proc.pid)
        rss = [proc.memory_info().rss]
        with daemon.daemon.admin_client() as client:
            for _ in range(ROUNDS + 1):
                client.unload("big")
                t = time.perf_counter()
                client.load("big")
                sealbox.append(time.perf_counter() - t)
                rss.append(proc.memory_info().rss)
                plain.append(plain_load(path))
                floor.append(verify_floor(files))
        events = [e for e in daemon.daemon.audit_events() if e["event"] == "model_load" and e.get("model") == "big"
                  and e.get("verdict") == "ready"]
    sealbox, plain, floor, events = sealbox[1:], plain[1:], floor[1:], events[1:]   # the first round warms up
    s, p, f = (statistics.median(x) for x in (sealbox, plain, floor))
    print(f"model {size / 2**30:.2f} GiB (one safetensors file), medians of {ROUNDS} interleaved rounds")
    print(f"  sealbox load -> READY (admin RPC)      {s:7.3f} s")
    print(f"  plain mx.load + mx.eval (in-process)   {p:7.3f} s")
    print(f"  verify floor (sha256 of the files)     {f:7.3f} s")
    print(f"  ratio: sealbox / (floor + mx.load) = {s / (f + p):.2f}x (goal <= 1.5x); sealbox / mx.load = {s / p:.2f}x")
    print("  phases (model_load audit event, medians): " + ", ".join(
        f"{k} {statistics.median([e[k] for e in events]):.3f}" for k in PHASES if all(k in e for e in events)))
    missing = [k for k in PHASES if not all(k in e for e in events)]
    if missing:
        print(f"  (not reported by this worker: {', '.join(missing)})")
    print(f"  daemon RSS: {rss[0] / 2**20:.0f} MiB before the first load, {rss[1] / 2**20:.0f} MiB after it, "
          f"{rss[-1] / 2**20:.0f} MiB after {ROUNDS} more reloads")


if __name__ == "__main__":
    main()
