"""What the strict safetensors checks cost next to MLX loading the same file.

A safetensors file of BENCH_FORMATS_MB (default 1024) written by mx.save_safetensors in a temporary
directory; page cache warm; medians of BENCH_ROUNDS (default 5) of:
  * the strict header check the MLX engine runs before mx.load (worker/formats/safetensors.py:
    read_file + check_for_mlx),
  * mx.load + mx.eval of the same file,
  * the post-load cross-check of what MLX returned against the header (check_loaded).
The goal (the formats issue): the checks cost under 5 % of mx.load.

Then the .mlxfn tape walk (worker/formats/mlxfn.py: check_file + check_graph) on the largest graph it
accepts (MAX_NODES nodes, MAX_DEPTH deep: Add nodes side by side, then a chain of them) and on the demo
model's graph, next to mx.import_function of the same file and its first call; medians of BENCH_ROUNDS.
"""
from __future__ import annotations

import os
import shutil
import statistics
import struct
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


def _largest_graph(nodes: int, depth: int) -> bytes:
    """An .mlxfn in MLX's own layout (worker/formats/mlxfn.py): one (2, 4) float32 input x (id 1), then
    nodes - 1 Add nodes: the first side by side (x + x, depth 1), the last depth - 1 of them a chain on top."""
    import mlx.core as mx

    def string(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    f32 = struct.pack("<Qii", 2, 2, 4) + struct.pack("<iB", 10, 4)
    add = struct.pack("<iii", 0, 0, 0) + string(b"Add") + struct.pack("<Q", 0) + f32
    out = [string(mx.__version__.encode()), struct.pack("<iB", 1, 1), string(b""), struct.pack("<Q", 0),
           struct.pack("<QQ", 1, 1), struct.pack("<Q", 1), f32, struct.pack("<QQ", 1, nodes), struct.pack("<Q", nodes),
           struct.pack("<QBB", 1, 0, 0)]
    wide = nodes - depth + 1            # ids 2..wide at depth 1, then each one deeper: the last at `depth`
    for node_id in range(2, nodes + 1):
        first = 1 if node_id <= wide else node_id - 1
        out.append(struct.pack("<QBQQQ", node_id, 1, 2, first, 1) + add)
    return b"".join(out)


def bench_mlxfn() -> None:
    import mlx.core as mx
    from sealbox.client.demo_model import build_demo_model
    from sealbox.worker.engine import TensorSpec
    from sealbox.worker.formats import mlxfn

    directory = tempfile.mkdtemp(prefix="sealbox-bench-mlxfn-")
    try:
        build_demo_model(os.path.join(directory, "demo"))
        largest = os.path.join(directory, "largest.mlxfn")
        with open(largest, "wb") as f:
            f.write(_largest_graph(mlxfn.MAX_NODES, mlxfn.MAX_DEPTH))
        x = [TensorSpec("x", "FP32", (-1, 4))]
        demo_weights = mx.load(os.path.join(directory, "demo", "weights.safetensors"))
        cases = [("largest accepted", largest, x, [TensorSpec("y", "FP32", (-1, 4))], {}, {}),
                 ("demo MLP", os.path.join(directory, "demo", "model.mlxfn"), x, [TensorSpec("y", "FP32", (-1, 3))],
                  {k: (v.ndim, "FP32") for k, v in demo_weights.items()}, demo_weights)]
        print(f".mlxfn tape walk vs MLX, medians of {ROUNDS}")
        for label, path, inputs, outputs, keywords, weights in cases:
            def walk():
                mlxfn.check_file(path, "model.mlxfn", mx.__version__)
                return mlxfn.check_graph(path, "model.mlxfn", inputs, outputs, keywords)

            def first_call():
                (y,) = mx.import_function(path)(mx.zeros((2, 4)), **weights)
                mx.eval(y)

            graph = walk()
            rounds = [(timed(walk, 1)[0], timed(lambda: mx.import_function(path), 1)[0], timed(first_call, 1)[0])
                      for _ in range(ROUNDS)]          # interleaved: the machine's load drifts alike for all three
            check, imported, called = (statistics.median(column) for column in zip(*rounds))
            print(f"  {label}: {graph['nodes']} nodes, depth {graph['depth']}, {os.path.getsize(path)} bytes")
            print(f"    tape walk (check_file + check_graph)        {ms(check)}")
            print(f"    mx.import_function                          {ms(imported)}")
            print(f"    mx.import_function + first call (batch 2)   {ms(called)}")
            print(f"    walk / import: {check / imported:.2f}x; walk / (import + first call): {check / called:.2f}x")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
    bench_mlxfn()
