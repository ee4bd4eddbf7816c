"""Shared helpers for the benchmarks: timing statistics and a signed demo daemon."""
from __future__ import annotations

import os
import statistics
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
    """sealboxd serving the signed demo model and an echo model from a temporary directory: the
    test suite's daemon runner (tests.support.daemon.Daemon) with the benchmark's two models."""

    def __init__(self, extra_workers: str = "", more_models: dict | None = None, server: str = ""):
        import pathlib

        from sealbox.client import publisher
        from sealbox.client.demo_model import build_demo_model
        from tests.support.daemon import Daemon
        from tests.support.pki import make_ec_key

        self.dir = tempfile.mkdtemp(prefix="sealbox-bench-")
        os.chmod(self.dir, 0o755)
        root = pathlib.Path(self.dir)
        (root / "keys").mkdir()
        self.private_key, public = make_ec_key(root / "keys", "demo-signer")
        build_demo_model(str(root / "model"))
        publisher.main(["sign", "key", str(root / "model"), "--private-key", str(self.private_key)])
        self._add_echo_model()
        models = {"demo": {"path": root / "model"}, "echo": {"path": root / "echo"}, **(more_models or {})}
        self.daemon = Daemon(root, models, public, workers=extra_workers, server=server)
        self.config, self.target = str(self.daemon.config), self.daemon.target

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
        publisher.main(["sign", "key", echo, "--private-key", str(self.private_key)])

    def __enter__(self):
        try:
            self.daemon.start()  # waits until the server answers ready
        except BaseException:
            self.daemon.stop()  # never leave a daemon behind
            raise
        return self

    def __exit__(self, *exc):
        self.daemon.stop()
