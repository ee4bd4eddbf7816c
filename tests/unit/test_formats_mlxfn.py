"""What is checked of an .mlxfn before MLX imports it: size, version field, the running MLX."""
from __future__ import annotations

import os

import pytest

from tests.support.formats import mlxfn_with_version
from sealbox.worker.engine import ModelError
from sealbox.worker.formats import mlxfn

os.environ.setdefault("MLX_DISABLE_COMPILE", "1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import mlx.core as mx
    directory = tmp_path_factory.mktemp("mlxfn")
    mx.export_function(str(directory / "s.mlxfn"), lambda x: x * 2, mx.zeros((1, 4)), shapeless=True)
    mx.export_function(str(directory / "f.mlxfn"), lambda x: x * 2, mx.zeros((1, 4)))
    return directory


def test_what_mlx_writes_is_accepted_with_its_shapeless_flag(exported):
    import mlx.core as mx
    assert mx.__version__ in mlxfn.KNOWN_VERSIONS, "a new MLX: re-check the layout notes in worker/formats/mlxfn.py"
    assert mlxfn.check_file(str(exported / "s.mlxfn"), "s.mlxfn", mx.__version__) == {
        "version": mx.__version__, "shapeless": True}
    assert mlxfn.check_file(str(exported / "f.mlxfn"), "f.mlxfn", mx.__version__)["shapeless"] is False


@pytest.mark.parametrize("version, message", [
    (b"0.31.0", "model.mlxfn: written by MLX 0.31.0; this reader knows the layout of MLX 0.32.4 only"),
    (b"0.32.4\x00", "model.mlxfn: version field b'0.32.4\\x00' is not an MLX version"),
    (b"", "model.mlxfn: version field length 0 is not that of an MLX version (1 to 32 bytes, then the graph)"),
    (b"9" * 33, "model.mlxfn: version field length 33 is not that of an MLX version (1 to 32 bytes, then the graph)"),
])
def test_unknown_or_malformed_versions_are_refused(tmp_path, exported, version, message):
    path = tmp_path / "model.mlxfn"
    path.write_bytes(mlxfn_with_version((exported / "s.mlxfn").read_bytes(), version))
    with pytest.raises(ModelError) as err:
        mlxfn.check_file(str(path), "model.mlxfn", "0.32.4")
    assert str(err.value) == message


def test_running_mlx_must_be_the_writer(exported):
    with pytest.raises(ModelError) as err:
        mlxfn.check_file(str(exported / "s.mlxfn"), "s.mlxfn", "0.33.0")
    assert str(err.value) == "s.mlxfn: written by MLX 0.32.4, but the worker runs MLX 0.33.0"


def test_size_bound_and_short_files(tmp_path):
    big = tmp_path / "big.mlxfn"
    with open(big, "wb") as f:
        f.truncate(mlxfn.MAX_BYTES + 1)      # sparse: nothing is read before the size is checked
    with pytest.raises(ModelError) as err:
        mlxfn.check_file(str(big), "big.mlxfn", "0.32.4")
    assert str(err.value) == f"big.mlxfn: {mlxfn.MAX_BYTES + 1} bytes, more than the {mlxfn.MAX_BYTES} an " \
                             "exported function may have"
    short = tmp_path / "short.mlxfn"
    short.write_bytes(b"\x06\x00")
    with pytest.raises(ModelError) as err:
        mlxfn.check_file(str(short), "short.mlxfn", "0.32.4")
    assert str(err.value) == "short.mlxfn: 2 bytes: too short for an MLX exported function"
