"""Flux/BSON.jl: scanner throughput and native-engine latency, each against a baseline in the same run.

    ./dev.sh bench flux   (or: /opt/sealbox/venv/bin/python -m benchmarks.bench_flux)

* scan: seconds per MB of BSON (median over repeats) for the accepted corpus files and a
  synthetic 16 MB Dense chain; baseline: reading the same bytes from the file.
* infer: native engine latency (median, p99) for the largest accepted corpus model (a 7-layer
  Dense chain) and the Conv/BatchNorm model; baseline: the same weights as a hand-written
  numpy chain (x @ W + b, activation), i.e. the cost of the scanner's layer records and checks.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import p99, timed
from sealbox.worker.flux import scanner
from sealbox.worker.flux.native_engine import FluxNativeEngine
from tests.support import SHARED
from tests.support.flux import Era

CORPUS = SHARED / "corpus" / "bsonjl"
ACCEPTED = ["Xiaocao-Cxh+PowerModel/model.d2d83e9f.bson", "banachtech+replicator/model.6f42a183.bson",
            "sebkaz+Julia_Deploy/02_Docker_app_nn_model.3630b035.bson"]
CALLS = int(os.environ.get("BENCH_CALLS", "2000"))


def bench_scan(label: str, path: Path, repeats: int) -> None:
    mb = path.stat().st_size / 1e6
    read = statistics.median(timed(lambda: path.read_bytes(), repeats))
    scan = statistics.median(timed(lambda: scanner.scan_file(path), repeats))
    print(f"scan  {label:<46} {mb:8.3f} MB  scan {scan / mb * 1e3:9.3f} ms/MB  "
          f"read {read / mb * 1e3:7.3f} ms/MB  ratio scan/read {scan / read:7.1f}x")


def numpy_chain(engine: FluxNativeEngine):
    """The same Dense weights as a plain numpy function (the baseline for Dense chains)."""
    acts = {"relu": lambda v: np.maximum(v, 0), "sigmoid": lambda v: 0.5 * (1 + np.tanh(v / 2)), "identity": lambda v: v}
    layers = [(layer.weight, layer.bias, acts[layer.activation]) for _, layer in engine.model.layers]

    def run(x):
        for w, b, act in layers:
            x = act(x @ w + b)
        return x
    return run


def bench_infer(label: str, engine: FluxNativeEngine, x: np.ndarray, baseline) -> None:
    inputs = {"input": x}
    engine.infer(inputs)
    ours = timed(lambda: engine.infer(inputs), CALLS)
    line = (f"infer {label:<46} batch {x.shape[0]:3d}  median {statistics.median(ours) * 1e6:8.1f} us  "
            f"p99 {p99(ours) * 1e6:8.1f} us")
    if baseline is not None:
        base = timed(lambda: baseline(x), CALLS)
        line += (f"  numpy chain median {statistics.median(base) * 1e6:7.1f} us  "
                 f"ratio {statistics.median(ours) / statistics.median(base):5.2f}x")
    print(line)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        e = Era("0.13")
        rng = np.random.default_rng(0)
        width = 1000     # 4 x 1000 x 1000 float32: 16 MB
        layers = [e.dense(rng.standard_normal((width, width), np.float32), np.zeros(width, np.float32), "relu")
                  for _ in range(4)]
        synthetic = Path(tmp) / "synthetic.bson"
        synthetic.write_bytes(e.file(e.chain(layers)))
        bench_scan("synthetic Chain of 4 Dense(1000 => 1000)", synthetic, 20)
        if not CORPUS.is_dir():
            print(f"corpus not found at {CORPUS}: corpus benchmarks skipped")
            return 0
        for name in ACCEPTED:
            bench_scan(name.split("/")[0], CORPUS / name, 200)
        dense = FluxNativeEngine.load({"model.bson": str(CORPUS / ACCEPTED[0])})
        for batch in (1, 64):
            x = rng.standard_normal((batch, 184)).astype(np.float32)
            bench_infer(ACCEPTED[0].split("/")[0], dense, x, numpy_chain(dense))
        conv = FluxNativeEngine.load({"model.bson": str(CORPUS / ACCEPTED[1])})
        for batch in (1, 64):
            x = rng.standard_normal((batch, 1, 28, 48)).astype(np.float32)
            bench_infer(ACCEPTED[1].split("/")[0] + " (no baseline)", conv, x, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
