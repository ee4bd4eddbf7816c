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


def worker_python(daemon) -> psutil.Process:
    for pid in daemon.worker_pids():
        try:
            proc = psutil.Process(pid)
            if "sealbox.worker.main" in " ".join(proc.cmdline()) and proc.name().startswith("python"):
                return proc
        except psutil.Error:  # a worker being replaced right now
            continue
    raise AssertionError("no worker process found")
