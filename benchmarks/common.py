"""Shared helpers for the benchmarks: timing statistics and a signed demo daemon."""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def timed(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls of fn."""
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return samples


def p99(samples: list[float]) -> float:
    return sorted(samples)[min(len(samples) - 1, int(len(samples) * 0.99))]


def stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "p99": p99(samples)}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f} ms"


class DemoDaemon:
    """sealboxd serving the signed demo model from a temporary directory."""

    def __init__(self, extra_workers: str = ""):
        from sealbox.client.demo import prepare
        self.dir = tempfile.mkdtemp(prefix="sealbox-bench-")
        os.chmod(self.dir, 0o755)
        self.config = prepare(self.dir)
        if extra_workers:
            text = open(self.config).read().replace("[workers]\n", "[workers]\n" + extra_workers + "\n")
            open(self.config, "w").write(text)
        self._add_echo_model()
        self.target = f"unix:{self.dir}/sealbox.sock"

    def _add_echo_model(self) -> None:
        """A model that returns its input times one: large-tensor throughput is then transport, not math."""
        import json
        os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
        import mlx.core as mx
        from sealbox.client import publisher
        echo = os.path.join(self.dir, "echo")
        os.makedirs(echo)
        mx.export_function(os.path.join(echo, "model.mlxfn"), lambda x: x * 1.0, mx.zeros((2, 4)), shapeless=True)
        spec = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        with open(os.path.join(echo, "model.json"), "w") as f:
            json.dump({"function": "model.mlxfn", "inputs": spec, "outputs": [dict(spec[0], name="y")]}, f)
        publisher.main(["sign", "key", echo, "--private-key", os.path.join(self.dir, "keys", "demo-signer.key")])
        with open(self.config, "a") as f:
            f.write(f'\n[models.echo]\npath = "{echo}"\nformat = "mlx"\n')

    def __enter__(self):
        from sealbox.client import Client
        self.proc = subprocess.Popen([sys.executable, "-m", "sealbox.daemon.main", "--config", self.config],
                                     stderr=subprocess.DEVNULL)
        with Client(self.target) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if client.ready() and client.model_ready("demo") and client.model_ready("echo"):
                        return self
                except Exception:
                    pass
                time.sleep(0.1)
        self.__exit__()  # never leave a daemon behind
        raise RuntimeError(f"sealboxd did not become ready; see {self.dir}/audit.jsonl")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
