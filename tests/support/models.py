"""Reference computations and helpers for the models served in tests."""
from __future__ import annotations

import numpy as np
import psutil

from sealbox.client.demo_model import demo_function, demo_weights


def reference(x: np.ndarray) -> np.ndarray:
    """The same exported function, run in-process with MLX."""
    import mlx.core as mx
    w = {k: mx.array(v) for k, v in demo_weights().items()}
    return np.array(demo_function(mx.array(x), **w))


def sealed_files(directory) -> dict[str, str]:
    """What a worker is handed for an engine loaded in-process: signed name -> /proc/self/fd/N of a
    sealed memfd holding that file's bytes (the descriptors stay open for the test process's life)."""
    import fcntl
    import os
    import pathlib

    from sealbox.proto.contract import MEMFD_SEALS
    files = {}
    for path in sorted(pathlib.Path(directory).iterdir()):
        fd = os.memfd_create(path.name, os.MFD_ALLOW_SEALING)
        os.write(fd, path.read_bytes())
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
        files[path.name] = f"/proc/self/fd/{fd}"
    return files


def worker_python(daemon) -> psutil.Process:
    for pid in daemon.worker_pids():
        try:
            proc = psutil.Process(pid)
            if "sealbox.worker.main" in " ".join(proc.cmdline()) and proc.name().startswith("python"):
                return proc
        except psutil.Error:  # a worker being replaced right now
            continue
    raise AssertionError("no worker process found")


def build_mlp_model(directory, mib: int) -> int:
    """An MLX model of one square dense layer whose weights file is about `mib` MiB (the `mlp`
    architecture over safetensors written by mx.save_safetensors), unsigned; returns the weights
    file's size. For tests and benchmarks that need a big model (verification, load phases, RSS)."""
    import json
    import os
    os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
    import mlx.core as mx
    side = int((mib * 2**20 / 4) ** 0.5)
    os.makedirs(directory, mode=0o755)
    weights = {"layers.0.weight": mx.random.normal((side, side)), "layers.0.bias": mx.zeros((side,))}
    path = os.path.join(directory, "weights.safetensors")
    mx.save_safetensors(path, weights)
    spec = {"name": "x", "datatype": "FP32", "shape": [-1, side]}
    with open(os.path.join(directory, "model.json"), "w") as f:
        json.dump({"architecture": {"type": "mlp"}, "weights": "weights.safetensors",
                   "inputs": [spec], "outputs": [dict(spec, name="y")]}, f)
    for name in ("weights.safetensors", "model.json"):
        os.chmod(os.path.join(directory, name), 0o644)
    return os.path.getsize(path)
