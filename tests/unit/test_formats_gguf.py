"""The strict GGUF reader: each defect refused with its name; what MLX writes accepted; the MLX cross-check."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.support.formats import GGUF_DEFECTS, gguf_bytes, gguf_mlp, mlp_weights
from sealbox.worker.engine import ModelError
from sealbox.worker.formats import gguf

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")


def check(tmp_path, data: bytes, name="model.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    header = gguf.read_file(str(path), name)
    gguf.check_for_mlx(header, name)
    return header


@pytest.mark.parametrize("defect", sorted(GGUF_DEFECTS))
def test_each_defect_is_refused_with_its_name(tmp_path, defect):
    data, message = GGUF_DEFECTS[defect]
    with pytest.raises(ModelError) as err:
        check(tmp_path, data)
    assert str(err.value) == f"model.gguf: {message}"


def test_truncated_files_are_refused_at_every_length(tmp_path):
    """Every prefix of a valid file is refused cleanly (no exception but ModelError, no over-read)."""
    data = gguf_mlp(metadata=[("general.name", 8, b"\x03\x00\x00\x00\x00\x00\x00\x00mlp")])
    check(tmp_path, data)
    for n in range(len(data)):
        with pytest.raises(ModelError):
            check(tmp_path, data[:n])


def test_accepts_what_mlx_writes_and_the_loaded_arrays_match(tmp_path):
    import mlx.core as mx
    arrays = {"f32": mx.ones((3, 5)), "f16": mx.ones((2, 2), dtype=mx.float16), "i32": mx.zeros(7, dtype=mx.int32)}
    path = tmp_path / "w.gguf"
    mx.save_gguf(str(path), arrays, {"general.name": "w", "n": mx.array(3), "tags": ["a", "b"]})
    header = gguf.read_file(str(path), "w.gguf")
    assert header.metadata == {"general.name": "w", "n": 3, "tags": ["a", "b"]}
    assert {t.name: (t.type_name, t.shape) for t in header.tensors} == {
        "f32": ("F32", (3, 5)), "f16": ("F16", (2, 2)), "i32": ("I32", (7,))}
    gguf.check_for_mlx(header, "w.gguf")
    gguf.check_loaded(header, mx.load(str(path)), "w.gguf")


def test_quantized_tensors_and_the_cross_check(tmp_path):
    import mlx.core as mx
    path = tmp_path / "q.gguf"
    path.write_bytes(gguf_bytes([("q", [64, 2], 2, b"\x11" * 4 * 18), ("b", [2], 0, b"\x00" * 8)]))
    header = check(tmp_path, path.read_bytes(), "q.gguf")
    loaded = mx.load(str(path))
    gguf.check_loaded(header, loaded, "q.gguf")
    assert gguf.expected_arrays(header)["q"] == ("uint32", (2, 8))
    del loaded["q.biases"]
    with pytest.raises(ModelError) as err:
        gguf.check_loaded(header, loaded, "q.gguf")
    assert str(err.value) == "q.gguf: MLX returned other tensors than the file declares (missing ['q.biases'], " \
                             "unexpected [])"


def test_mlx_alone_mishandles_what_the_reader_refuses(tmp_path):
    """Why the reader exists: MLX 0.32 silently stops at a tensor of unknown type (returning the ones before it)
    and loads a zero dimension as an empty tensor."""
    import mlx.core as mx
    path = tmp_path / "t.gguf"
    path.write_bytes(GGUF_DEFECTS["invalid_type"][0])
    assert sorted(mx.load(str(path))) == ["layers.0.bias", "layers.0.weight"]
    path.write_bytes(GGUF_DEFECTS["zero_dimension"][0])
    assert mx.load(str(path))["extra"].shape == (0, 4)
    path.write_bytes(gguf_mlp())
    loaded = mx.load(str(path))
    for name, array in mlp_weights().items():
        np.testing.assert_array_equal(np.array(loaded[name]), array)
