""".mlxfn function table, checked before MLX imports the file: one function, arity against model.json and the
weights, node count bounded, the tape walked (known primitives, depth bounded) (worker/formats/mlxfn.py,
check_graph). Refusals name the file and the defect; through a real daemon nothing is served, and another
model answers throughout."""
from __future__ import annotations

import json
import os
import pathlib
import struct
import threading
import time

import grpc
import numpy as np
import pytest

from tests.support.daemon import Daemon
from tests.support.formats import add_chain, add_node, crashing_mlxfn_seeds, mutated_mlxfn
from tests.support.pki import upstream_sign
from sealbox.worker.engine import ModelError, TensorSpec
from sealbox.worker.formats import mlxfn

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")

X = [TensorSpec("x", "FP32", (-1, 4))]
Y = [TensorSpec("y", "FP32", (-1, 4))]
REFUSED = "worker exited with code 3 (model refused by the engine) while loading: model refused: "


def test_the_synthesised_chain_is_a_real_mlx_graph(tmp_path):
    import mlx.core as mx
    path = tmp_path / "c.mlxfn"
    path.write_bytes(add_chain(5))
    assert mlxfn.check_file(str(path), "c.mlxfn", mx.__version__) == {"version": mx.__version__, "shapeless": True}
    assert mlxfn.check_graph(str(path), "c.mlxfn", X, Y, {}) == {"nodes": 6, "depth": 5}
    (y,) = mx.import_function(str(path))(mx.ones((3, 4)))
    np.testing.assert_array_equal(np.array(y), np.full((3, 4), 6, np.float32))


def test_what_mlx_exports_passes_with_its_node_count(tmp_path):
    import mlx.core as mx
    from sealbox.client.demo_model import build_demo_model
    build_demo_model(str(tmp_path / "demo"))
    weights = mx.load(str(tmp_path / "demo" / "weights.safetensors"))
    meta = json.loads((tmp_path / "demo" / "model.json").read_text())
    inputs = [TensorSpec.from_json(t, "inputs") for t in meta["inputs"]]
    outputs = [TensorSpec.from_json(t, "outputs") for t in meta["outputs"]]
    got = mlxfn.check_graph(str(tmp_path / "demo" / "model.mlxfn"), "model.mlxfn", inputs, outputs,
                            {k: (v.ndim, "FP32") for k, v in weights.items()})
    assert 3 < got["nodes"] < 100
    # Two positional inputs and two outputs, exported by MLX.
    mx.export_function(str(tmp_path / "two.mlxfn"), lambda a, b: (a + b, a * b), mx.zeros((2, 4)),
                       mx.zeros((2, 4)), shapeless=True)
    two_in = [TensorSpec("a", "FP32", (-1, 4)), TensorSpec("b", "FP32", (-1, 4))]
    assert mlxfn.check_graph(str(tmp_path / "two.mlxfn"), "two.mlxfn", two_in, Y * 2, {})["nodes"] in range(4, 9)


def test_mutants_that_crash_mlx_import_are_refused_by_the_walk_first(tmp_path):
    """Two-byte mutants of the demo graph on which plain MLX 0.32.4's mx.import_function dies of a signal
    (about 1 in 100): the strict reader refuses each of them, naming the file, before MLX would read a byte."""
    import mlx.core as mx
    from sealbox.client.demo_model import build_demo_model
    build_demo_model(str(tmp_path / "demo"))
    graph = (tmp_path / "demo" / "model.mlxfn").read_bytes()
    seeds = crashing_mlxfn_seeds(graph)
    assert seeds, "no mutated graph crashed MLX's import in the search"
    meta = json.loads((tmp_path / "demo" / "model.json").read_text())
    inputs = [TensorSpec.from_json(t, "inputs") for t in meta["inputs"]]
    outputs = [TensorSpec.from_json(t, "outputs") for t in meta["outputs"]]
    keywords = {k: (v.ndim, "FP32") for k, v in mx.load(str(tmp_path / "demo" / "weights.safetensors")).items()}
    for seed in seeds:
        path = tmp_path / f"mutant{seed}.mlxfn"
        path.write_bytes(mutated_mlxfn(graph, seed))
        with pytest.raises(ModelError) as err:
            mlxfn.check_file(str(path), "model.mlxfn", mx.__version__)
            mlxfn.check_graph(str(path), "model.mlxfn", inputs, outputs, keywords)
        assert str(err.value).startswith("model.mlxfn: "), seed


def _refusal(path, inputs=X, outputs=Y, keywords=None) -> str:
    with pytest.raises(ModelError) as err:
        mlxfn.check_graph(str(path), "model.mlxfn", inputs, outputs, keywords or {})
    return str(err.value)


def test_arity_and_types_against_model_json_and_weights(tmp_path):
    import mlx.core as mx
    path = tmp_path / "model.mlxfn"
    mx.export_function(str(path), lambda x, w: x @ w, mx.zeros((2, 4)), w=mx.zeros((4, 4)), shapeless=True)
    ok = {"w": (2, "FP32")}
    assert mlxfn.check_graph(str(path), "model.mlxfn", X, Y, ok)["nodes"] >= 2
    assert _refusal(path, X * 2, Y, ok) == (
        "model.mlxfn: the function takes 1 positional inputs, but model.json lists 2 (x, x)")
    assert _refusal(path, X, Y * 3, ok) == (
        "model.mlxfn: the function returns 1 outputs, but model.json lists 3 (y, y, y)")
    assert _refusal(path, X, Y, {"w": (2, "FP32"), "b": (1, "FP32")}) == (
        "model.mlxfn: the function's keyword inputs ['w'] are not the weights' tensors ['b', 'w']")
    assert _refusal(path, X, Y, {"w": (1, "FP32")}) == (
        "model.mlxfn: keyword input 'w' is FP32 of rank 2 in the function, but the weight is FP32 of rank 1")
    assert _refusal(path, [TensorSpec("x", "FP16", (-1, 4))], Y, ok) == (
        "model.mlxfn: input 'x' is FP32 of rank 2 in the function, but model.json declares FP16 [-1, 4]")
    assert _refusal(path, [TensorSpec("x", "FP32", (-1, 4, 1))], Y, ok) == (
        "model.mlxfn: input 'x' is FP32 of rank 2 in the function, but model.json declares FP32 [-1, 4, 1]")


def test_function_count_and_node_count_fields(tmp_path):
    import mlx.core as mx
    data = bytearray(add_chain(3))
    count_at = 8 + len(mx.__version__)
    two = tmp_path / "two.mlxfn"
    two.write_bytes(bytes(data[:count_at]) + struct.pack("<i", 2) + bytes(data[count_at + 4:]))
    assert _refusal(two) == ("model.mlxfn: holds 2 functions; sealbox serves files with exactly one "
                             "(what mx.export_function writes)")
    # The tape size field claims more nodes than the file can hold (under the bound).
    tape_at = count_at + 4 + 1 + 8 + 8 + 16 + 29 + 16   # count, flag, metadata, keywords, ids, input, outputs
    assert data[tape_at:tape_at + 8] == struct.pack("<Q", 4)
    lying = tmp_path / "lying.mlxfn"
    lying.write_bytes(bytes(data[:tape_at]) + struct.pack("<Q", 90_000) + bytes(data[tape_at + 8:]))
    left = len(data) - tape_at - 8
    assert _refusal(lying) == f"model.mlxfn: claims 90000 nodes, but only {left} bytes follow (at least 10 per node)"
    huge = tmp_path / "huge.mlxfn"
    huge.write_bytes(bytes(data[:tape_at]) + struct.pack("<Q", 2**63) + bytes(data[tape_at + 8:]))
    assert _refusal(huge) == ("model.mlxfn: a graph of 9223372036854775808 nodes, more than the 100000 an "
                              "exported function may have")
    truncated = tmp_path / "truncated.mlxfn"
    truncated.write_bytes(bytes(data[:count_at + 30]))
    assert _refusal(truncated) == "model.mlxfn: 1 input ids; at most 4096, and no more than the file holds"


def test_a_200k_node_graph_is_refused_in_milliseconds(tmp_path):
    path = tmp_path / "model.mlxfn"
    path.write_bytes(add_chain(200_000))
    started = time.monotonic()
    message = _refusal(path)
    assert time.monotonic() - started < 0.5
    assert message == "model.mlxfn: a graph of 200001 nodes, more than the 100000 an exported function may have"


def _model(directory: pathlib.Path, graph: bytes, outputs: int, key) -> pathlib.Path:
    directory.mkdir(parents=True)
    (directory / "model.mlxfn").write_bytes(graph)
    (directory / "model.json").write_text(json.dumps({
        "function": "model.mlxfn", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": f"y{i}", "datatype": "FP32", "shape": [-1, 4]} for i in range(outputs)]}))
    upstream_sign(directory, key)
    return directory


def test_through_the_daemon_big_deep_unknown_graphs_and_wrong_arity_are_refused_and_nothing_is_served(tmp_path, keys):
    deep = mlxfn.MAX_DEPTH + 1      # MLX itself imports and serves this chain in a fraction of a second
    models = {"chain": {"path": _model(tmp_path / "m" / "chain", add_chain(1000), 1, keys[0])},
              "big": {"path": _model(tmp_path / "m" / "big", add_chain(200_000), 1, keys[0]), "load": False},
              "deep": {"path": _model(tmp_path / "m" / "deep", add_chain(deep), 1, keys[0]), "load": False},
              "unknown": {"path": _model(tmp_path / "m" / "unknown",
                                         add_chain(0, tape=[add_node(2, (1, 1), name=b"Foo")]), 1, keys[0]),
                          "load": False},
              "arity": {"path": _model(tmp_path / "m" / "arity", add_chain(10), 2, keys[0]), "load": False}}
    (tmp_path / "d").mkdir()
    daemon = Daemon(tmp_path / "d", models, keys[1]).start()
    try:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        answers, failures, done = [], [], threading.Event()

        def answering():                  # the served chain, called all the while the others are refused
            with daemon.client() as other:
                while not done.wait(0.02):
                    try:
                        np.testing.assert_array_equal(other.infer("chain", {"x": x})["y0"], 1001 * x)
                        answers.append(1)
                    except Exception as exc:  # noqa: BLE001 - any failure fails the test
                        failures.append(repr(exc))

        with daemon.client() as client:
            np.testing.assert_array_equal(client.infer("chain", {"x": x})["y0"], 1001 * x)
            thread = threading.Thread(target=answering, daemon=True)
            thread.start()
            for model, reason, most_s in (
                    ("big", "model.mlxfn: a graph of 200001 nodes, more than the 100000 an exported function "
                            "may have", 20),
                    ("deep", f"model.mlxfn: node {deep + 1} lies {deep} primitives deep, more than the "
                             f"{mlxfn.MAX_DEPTH} an exported function may have", 60),
                    ("unknown", "model.mlxfn: node 2 uses primitive 'Foo', which this reader does not know "
                                "(MLX 0.32.4)", 60),
                    ("arity", "model.mlxfn: the function returns 1 outputs, but model.json lists 2 (y0, y1)", 60)):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    client.load(model)
                assert time.monotonic() - started < most_s
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                status = client.status(model)
                assert status.state == "UNAVAILABLE" and status.reason == REFUSED + reason
                assert client.model_ready(model) is False
                with pytest.raises(grpc.RpcError) as err:
                    client.infer(model, {"x": x})
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            done.set()
            thread.join(timeout=60)
            assert not failures and answers, failures
            np.testing.assert_array_equal(client.infer("chain", {"x": x})["y0"], 1001 * x)
    finally:
        daemon.stop()
