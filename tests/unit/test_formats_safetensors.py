"""The strict safetensors reader: what it refuses (each defect named), what it accepts, and the MLX cross-check."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from tests.support.formats import SAFETENSORS_DEFECTS, mlp_safetensors, mlp_weights, safetensors_bytes
from sealbox.worker.engine import ModelError
from sealbox.worker.formats import safetensors

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")


def check(tmp_path, data: bytes, name="weights.safetensors"):
    path = tmp_path / name
    path.write_bytes(data)
    header = safetensors.read_file(str(path), name)
    safetensors.check_for_mlx(header, name)
    return header


@pytest.mark.parametrize("defect", sorted(SAFETENSORS_DEFECTS))
def test_each_defect_is_refused_with_its_name(tmp_path, defect):
    data, message = SAFETENSORS_DEFECTS[defect]
    with pytest.raises(ModelError) as err:
        check(tmp_path, data)
    assert str(err.value) == f"weights.safetensors: {message}"


def test_short_files_and_empty_headers(tmp_path):
    for data, message in ((b"", "0 bytes: too short for a header length (8 bytes)"),
                          (struct.pack("<Q", 1) + b"{", "header length 1 cannot hold a JSON object"),
                          (safetensors_bytes("{ "), "header is not valid JSON (Expecting property name enclosed "
                                                   "in double quotes at byte 2)"),
                          (safetensors_bytes('{"a": 1} x'), "header goes on after its JSON object with 'x' "
                                                            "(only spaces may pad it)"),
                          (safetensors_bytes("[" * 100_000 + "]" * 100_000),
                           "header does not start with '{'")):
        with pytest.raises(ModelError) as err:
            check(tmp_path, data)
        assert str(err.value) == f"weights.safetensors: {message}"
    with pytest.raises(ModelError) as err:     # nested past Python's recursion limit: refused, not a crash
        check(tmp_path, safetensors_bytes('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"))
    assert str(err.value).startswith("weights.safetensors: header is not valid JSON (maximum recursion depth")


def test_accepts_what_mlx_writes_for_every_dtype_it_loads(tmp_path):
    import mlx.core as mx
    arrays = {dtype: mx.zeros((2, 3), dtype=getattr(mx, mlx_name.replace("bool", "bool_")))
              for dtype, mlx_name in safetensors.MLX_DTYPES.items()}
    arrays["empty"] = mx.zeros((0, 5))
    arrays["scalar"] = mx.array(3.0)
    path = tmp_path / "all.safetensors"
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    header = safetensors.read_file(str(path), "all.safetensors")
    safetensors.check_for_mlx(header, "all.safetensors")
    assert header.metadata == {"format": "mlx"}
    assert {t.name: t.shape for t in header.tensors} == {name: tuple(a.shape) for name, a in arrays.items()}
    assert {t.name: t.dtype for t in header.tensors if t.name in safetensors.MLX_DTYPES} == {
        name: name for name in safetensors.MLX_DTYPES}
    safetensors.check_loaded(header, mx.load(str(path)), "all.safetensors")


def test_space_padding_empty_header_and_zero_sized_tensors_are_well_formed(tmp_path):
    header, data = mlp_safetensors(mlp_weights())
    end = len(data)
    header["nothing"] = {"dtype": "U8", "shape": [0, 7], "data_offsets": [end, end]}
    parsed = check(tmp_path, safetensors_bytes(header, data, pad=b"   "))
    assert [t.name for t in parsed.tensors] == ["layers.0.bias", "layers.0.weight", "layers.1.bias",
                                                "layers.1.weight", "nothing"]
    assert parsed.data_start == 8 + len(__import__("json").dumps(header)) + 3
    assert check(tmp_path, safetensors_bytes("{}")).tensors == ()
    assert check(tmp_path, safetensors_bytes('{"__metadata__": null}')).metadata == {}


def test_accepts_mlx_default_output(tmp_path):
    import mlx.core as mx
    mx.save_safetensors(str(tmp_path / "weights.safetensors"), {"a": mx.zeros(2)})  # writes "__metadata__": null
    header = safetensors.read_file(str(tmp_path / "weights.safetensors"), "weights.safetensors")
    assert [(t.name, t.dtype, t.shape) for t in header.tensors] == [("a", "F32", (2,))]


def test_the_cross_check_catches_mlx_disagreeing_with_the_header(tmp_path):
    """MLX 0.32 loads a dimension past 2^32 truncated: the cross-check would name that too."""
    import mlx.core as mx
    header, data = mlp_safetensors(mlp_weights())
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    parsed = safetensors.read_file(str(path), "w.safetensors")
    loaded = mx.load(str(path))
    safetensors.check_loaded(parsed, loaded, "w.safetensors")
    loaded["layers.1.bias"] = loaded["layers.1.bias"].astype(mx.float16)
    with pytest.raises(ModelError) as err:
        safetensors.check_loaded(parsed, loaded, "w.safetensors")
    assert str(err.value) == ("w.safetensors: tensor 'layers.1.bias': MLX loaded float16 [3], "
                              "the header declares F32 [3]")
    loaded["extra"] = mx.zeros(1)
    with pytest.raises(ModelError) as err:
        safetensors.check_loaded(parsed, loaded, "w.safetensors")
    assert str(err.value) == ("w.safetensors: MLX returned other tensors than the header declares "
                              "(missing [], unexpected ['extra'])")


def test_mlx_alone_accepts_what_the_reader_refuses(tmp_path):
    """Why the reader exists: each of these loads in MLX 0.32 without a complaint."""
    import mlx.core as mx
    for defect in ("dimension_past_2_32", "float_offsets", "nul_padding", "trailing_bytes", "overlap"):
        path = tmp_path / f"{defect}.safetensors"
        path.write_bytes(SAFETENSORS_DEFECTS[defect][0])
        loaded = mx.load(str(path))
        mx.eval(list(loaded.values()))
    overlap = mx.load(str(tmp_path / "overlap.safetensors"))
    assert np.array(overlap["layers.0.bias"])[:32].tolist() == [1.0] * 32   # the weight's bytes, served as bias
