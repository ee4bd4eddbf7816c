"""A verified 1 GiB safetensors model to READY, against plain mx.load + mx.eval and the verify floor, with
the phase breakdown from each load's audit event, and the daemon's RSS across the reloads.

    python -m benchmarks.bench_load      (from the repository root; BENCH_LOAD_MB=1024, BENCH_ROUNDS=5)

The model (one dense layer, weights written by mx.save_safetensors) is signed with the upstream
`model_signing sign key`. Three daemons serve it: one spawning the worker after verification
(`warm_pool = 0` with `early_start = false`), one starting it while verifying (the
default with `warm_pool = 0`: a pool-style worker handed the sealed fds once verification succeeded),
and one with a warm pool (`warm_pool = 1`: a pre-started confined worker takes the sealed fds). Each
round, interleaved (each daemon first in turn): each daemon loads it through the admin socket
(RepositoryModelLoad: policy, storage checks, signature, hashing into sealed memfds, spawn or hand-over,
the strict safetensors check, mx.load, warm-up) until READY, then unloads it again (the pool refilled and
idle before it is timed); in this process, plain `mx.load` + `mx.eval` of the same file; the verify
floor, reading and SHA-256-hashing the model's files with one thread per core (one file: one SHA-256
stream, which no verifier can split). Goal (issue 11): load-to-READY <= 1.5x (verify floor + plain
mx.load).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pathlib
import shutil
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
PHASES = ("verify_s", "hash_s", "spawn_s", "worker_deserialize_s", "worker_read_s", "worker_warmup_s", "worker_load_s", "ready_s")


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


def pool_idle(daemon, timeout: float = 60.0) -> None:
    """Wait until the daemon's pool worker listens (a taken one's directory goes with its unload) and
    its start-up CPU is spent, so a timed load does not share the cores with the refill."""
    deadline = time.monotonic() + timeout
    while not glob.glob(os.path.join(daemon.daemon.run_dir, "*-pool-*", "worker.sock")):
        if time.monotonic() > deadline:
            raise TimeoutError("no pool worker listened")
        time.sleep(0.05)
    time.sleep(0.3)


class Variant:
    def __init__(self, label: str, daemon: DemoDaemon, pool: bool):
        self.label, self.daemon, self.pool = label, daemon, pool
        self.times: list[float] = []
        self.rss: list[int] = []

    def __enter__(self):
        self.daemon.__enter__()
        self.rss0 = psutil.Process(self.daemon.daemon.proc.pid).memory_info().rss
        return self

    def __exit__(self, *exc):
        return self.daemon.__exit__(*exc)

    def round(self) -> None:
        if self.pool:
            pool_idle(self.daemon)
        with self.daemon.daemon.admin_client() as client:
            t = time.perf_counter()
            client.load("big")
            self.times.append(time.perf_counter() - t)
            self.rss.append(psutil.Process(self.daemon.daemon.proc.pid).memory_info().rss)
            client.unload("big")

    def events(self) -> list[dict]:
        return [e for e in self.daemon.daemon.audit_events() if e["event"] == "model_load"
                and e.get("model") == "big" and e.get("verdict") == "ready"]


def main() -> None:
    top = tempfile.mkdtemp(prefix="sealbox-bench-big-")
    try:
        run(top)
    finally:
        shutil.rmtree(top, ignore_errors=True)   # three copies of the model


def run(top: str) -> None:
    os.chmod(top, 0o755)
    dirs = {k: os.path.join(top, k) for k in ("spawn", "early", "pool")}   # each daemon trusts its own key
    variants = [
        Variant("spawn after verifying", DemoDaemon("memory_mb = 4096\nearly_start = false",
                                                    {"big": {"path": dirs["spawn"], "load": False}}), pool=False),
        Variant("early start (warm_pool = 0)", DemoDaemon("memory_mb = 4096", {"big": {"path": dirs["early"],
                                                                                     "load": False}}), pool=False),
        Variant("warm pool (warm_pool = 1)", DemoDaemon("memory_mb = 4096\nwarm_pool = 1",
                                                        {"big": {"path": dirs["pool"], "load": False}}), pool=True),
    ]
    size = build_mlp_model(dirs["spawn"], SIZE_MB)
    for variant, directory in zip(variants, dirs.values()):
        if directory != dirs["spawn"]:
            shutil.copytree(dirs["spawn"], directory)
        upstream_sign(pathlib.Path(directory), variant.daemon.private_key)
    path = os.path.join(dirs["spawn"], "weights.safetensors")
    files = [os.path.join(dirs["spawn"], n) for n in os.listdir(dirs["spawn"]) if n != "model.sig"]
    plain_load(path)  # page cache warm for all
    plain, floor = [], []
    load_avg = [os.getloadavg()[0]]
    with contextlib.ExitStack() as running:
        for variant in variants:
            running.enter_context(variant)
        for r in range(ROUNDS + 1):
            for variant in variants[r % 3:] + variants[:r % 3]:   # each goes first in turn
                variant.round()
            plain.append(plain_load(path))
            floor.append(verify_floor(files))
        events = {v.label: v.events()[1:] for v in variants}
    load_avg.append(os.getloadavg()[0])
    plain, floor = plain[1:], floor[1:]   # the first round warms up
    p, f = statistics.median(plain), statistics.median(floor)
    print(f"model {size / 2**30:.2f} GiB (one safetensors file), medians of {ROUNDS} interleaved rounds, "
          f"load average {load_avg[0]:.2f} -> {load_avg[1]:.2f}")
    print(f"  plain mx.load + mx.eval (in-process)   {p:7.3f} s")
    print(f"  verify floor (sha256 of the files)     {f:7.3f} s")
    for v in variants:
        s = statistics.median(v.times[1:])
        ev = events[v.label]
        print(f"  sealbox load -> READY, {v.label:28s} {s:7.3f} s = {s / (f + p):.2f}x (floor + mx.load) "
              f"(goal <= 1.5x); {s / p:.2f}x mx.load; worker path {'+'.join(sorted({e.get('path', '?') for e in ev}))}")
        print("    phases (model_load audit event, medians): " + ", ".join(
            f"{k} {statistics.median([e[k] for e in ev]):.3f}" for k in PHASES if ev and all(k in e for e in ev)))
        missing = [k for k in PHASES if not all(k in e for e in ev)]
        if missing:
            print(f"    (not reported: {', '.join(missing)})")
        print(f"    daemon RSS: {v.rss0 / 2**20:.0f} MiB before the first load, {v.rss[0] / 2**20:.0f} MiB "
              f"after it, {v.rss[-1] / 2**20:.0f} MiB after {ROUNDS} more reloads")


if __name__ == "__main__":
    main()
