"""What the strict safetensors checks cost next to MLX loading the same file.

A safetensors file of BENCH_FORMATS_MB (default 1024) written by mx.save_safetensors in a temporary
directory; page cache warm; medians of BENCH_ROUNDS (default 5) of:
  * the strict header check the MLX engine runs before mx.load (worker/formats/safetensors.py:
    read_file + check_for_mlx),
  * mx.load + mx.eval of the same file,
  * the post-load cross-check of what MLX returned against the header (check_loaded).
The goal (the formats issue): the checks cost under 5 % of mx.load.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile

from benchmarks.common import ms, timed

SIZE_MB = int(os.environ.get("BENCH_FORMATS_MB", "1024"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


def build(path: str) -> int:
    """Weights like a model's: a few large matrices and many small vectors (layer norms, biases)."""
    import mlx.core as mx
    layers = 8
    side = int((SIZE_MB * 2**20 / 4 / layers) ** 0.5)
    weights = {}
    for i in range(layers):
        weights[f"layers.{i}.weight"] = mx.random.normal((side, side))
        weights[f"layers.{i}.bias"] = mx.zeros((side,))
        weights[f"layers.{i}.norm.weight"] = mx.ones((side,))
    mx.save_safetensors(path, weights)
    return os.path.getsize(path)


def main() -> None:
    os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
    import mlx.core as mx
    from sealbox.worker.formats import safetensors

    directory = tempfile.mkdtemp(prefix="sealbox-bench-formats-")
    try:
        path = os.path.join(directory, "weights.safetensors")
        size = build(path)
        name = "weights.safetensors"

        def strict():
            safetensors.check_for_mlx(safetensors.read_file(path, name), name)

        def load():
            weights = mx.load(path, format="safetensors")
            mx.eval(list(weights.values()))

        header = safetensors.read_file(path, name)
        loaded = mx.load(path, format="safetensors")
        mx.eval(list(loaded.values()))          # also warms the page cache
        strict()
        check = statistics.median(timed(strict, ROUNDS))
        mlx_load = statistics.median(timed(load, ROUNDS))
        cross = statistics.median(timed(lambda: safetensors.check_loaded(header, loaded, name), ROUNDS))
        print(f"safetensors {size / 2**30:.2f} GiB, {len(header.tensors)} tensors, medians of {ROUNDS} (page cache warm)")
        print(f"  strict header check (read_file + check_for_mlx) {ms(check)}")
        print(f"  post-load cross-check (check_loaded)            {ms(cross)}")
        print(f"  mx.load + mx.eval                               {ms(mlx_load)}")
        total = check + cross
        print(f"  checks / mx.load: {check / mlx_load:.4%} + {cross / mlx_load:.4%} = {total / mlx_load:.4%} "
              f"(goal < 5%: {'met' if total < 0.05 * mlx_load else 'NOT met'})")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
