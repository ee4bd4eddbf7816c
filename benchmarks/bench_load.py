"""Cold load of a verified, sandboxed 1 GiB safetensors model (RepositoryModelLoad: policy, storage checks,
signature, hashing into sealed memfds, spawn, load, warm-up) against a plain in-process mx.load + mx.eval
+ one SHA-256 of the file. Size: BENCH_LOAD_MB (default 1024)."""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time

from benchmarks.common import DemoDaemon, ms

SIZE_MB = int(os.environ.get("BENCH_LOAD_MB", "1024"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


def build_big_model(directory: str, key: str) -> int:
    os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
    import mlx.core as mx
    from sealbox.client import publisher
    side = int((SIZE_MB * 2**20 / 4) ** 0.5)
    os.makedirs(directory)
    weights = {"layers.0.weight": mx.random.normal((side, side)), "layers.0.bias": mx.zeros((side,))}
    mx.save_safetensors(os.path.join(directory, "weights.safetensors"), weights)
    spec = {"name": "x", "datatype": "FP32", "shape": [-1, side]}
    with open(os.path.join(directory, "model.json"), "w") as f:
        json.dump({"architecture": {"type": "mlp"}, "weights": "weights.safetensors",
                   "inputs": [spec], "outputs": [dict(spec, name="y")]}, f)
    publisher.main(["sign", "key", directory, "--private-key", key])
    return os.path.getsize(os.path.join(directory, "weights.safetensors"))


def in_process(path: str) -> float:
    import mlx.core as mx
    t = time.perf_counter()
    weights = mx.load(path)
    mx.eval(list(weights.values()))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    elapsed = time.perf_counter() - t
    del weights
    return elapsed


if __name__ == "__main__":
    import tempfile
    big = os.path.join(tempfile.mkdtemp(prefix="sealbox-bench-big-"), "big")
    os.chmod(os.path.dirname(big), 0o755)
    daemon = DemoDaemon("memory_mb = 4096", {"big": {"path": big, "load": False}})
    size = build_big_model(big, str(daemon.private_key))
    path = os.path.join(big, "weights.safetensors")
    in_process(path)  # page cache warm for both
    with daemon:
        with daemon.daemon.admin_client() as client:
            sandboxed = []
            for _ in range(ROUNDS):
                client.unload("big")
                t = time.perf_counter()
                client.load("big")
                sandboxed.append(time.perf_counter() - t)
    plain = [in_process(path) for _ in range(ROUNDS)]
    s, p = statistics.median(sandboxed), statistics.median(plain)
    print(f"cold load {size / 2**30:.2f} GiB   sealbox (verify + sandboxed worker) median {ms(s)}   "
          f"in-process mx.load+eval+sha256 median {ms(p)}   ratio {s / p:.2f}x")
