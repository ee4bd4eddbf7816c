"""`sealbox scan`: the scanner's verdict, computed inside a worker sandbox."""
import json
import pathlib
import struct
import subprocess

from tests.support import PYTHON, require_shared
from tests.support.formats import (GGUF_DEFECTS, SAFETENSORS_DEFECTS, gguf_mlp, mlp_safetensors, mlp_weights,
                                   safetensors_bytes)

from sealbox.sandbox.tools import scan_kind

SEALBOX = str(pathlib.Path(PYTHON).with_name("sealbox"))


def scan(*args):
    return subprocess.run([SEALBOX, "scan", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_scan_accepts_a_corpus_dense_chain():
    path = require_shared("corpus/bsonjl") / "sebkaz+Julia_Deploy/02_Docker_app_nn_model.3630b035.bson"
    result = scan(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}: accepted (Flux model under key 'model')",
        "  model.layers[1]: Dense(13 => 42, relu)",
        "  model.layers[2]: Dense(42 => 1)",
        "  input [-1, 13] FP32 -> output [-1, 1] FP32"]


def test_scan_refuses_the_closure_model_with_every_reason():
    path = require_shared("corpus/bsonjl") / "DhairyaLGandhi+JuliaCon2020_dash/model_conv.7d17a1f4.bson"
    result = scan(path, "--json")
    assert result.returncode == 1, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["status"] == "refused"
    assert verdict["file"] == str(path)
    assert verdict["reasons"][0] == {"place": "model.layers[7]",
                                     "message": "serialized closure (jl_anonymous): code in the model file"}
    text = scan(path)
    assert text.returncode == 1
    assert "  model.layers[7]: serialized closure (jl_anonymous): code in the model file" in text.stdout.splitlines()


def test_scan_usage_and_io_errors(tmp_path):
    missing = scan(tmp_path / "missing.bson")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"sealbox scan: {tmp_path / 'missing.bson'}: No such file or directory"
    garbage = tmp_path / "garbage.bson"
    garbage.write_bytes(b"\x05\x00\x00\x00\x01")   # a BSON length that lies
    result = scan(garbage)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{garbage}: ")


# ---- safetensors, GGUF and .mlxfn: the MLX engine's strict readers, in an MLX worker's sandbox

def test_scan_accepts_a_valid_safetensors_file(tmp_path):
    path = tmp_path / "weights.bin"      # picked by content (u64 length, then '{'), not by name
    path.write_bytes(safetensors_bytes(*mlp_safetensors(mlp_weights())))
    result = scan(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{path}: accepted (safetensors, 4 tensors, {path.stat().st_size} bytes)"]
    verdict = json.loads(scan(path, "--json").stdout)
    assert verdict == {"file": str(path), "status": "accepted", "format": "safetensors", "tensors": 4,
                       "bytes": path.stat().st_size,
                       "summary": f"safetensors, 4 tensors, {path.stat().st_size} bytes"}


def test_scan_refuses_malformed_safetensors_with_the_readers_message(tmp_path):
    for defect in ("nul_padding", "overlap", "dimension_past_2_32_zero_sized"):
        data, message = SAFETENSORS_DEFECTS[defect]
        path = tmp_path / f"{defect}.safetensors"
        path.write_bytes(data)
        result = scan(path)
        assert result.returncode == 1, (defect, result.stdout, result.stderr)
        assert result.stdout.splitlines() == [f"{path}: {message}"], defect
    verdict = json.loads(scan(path, "--json").stdout)
    assert verdict == {"file": str(path), "format": "safetensors", "status": "refused", "reason": message}


def test_scan_refuses_malformed_gguf(tmp_path):
    for defect in ("invalid_type", "zero_dimension"):
        data, message = GGUF_DEFECTS[defect]
        path = tmp_path / f"{defect}.weights"     # by the magic, not the name
        path.write_bytes(data)
        result = scan(path)
        assert result.returncode == 1, (defect, result.stdout, result.stderr)
        assert result.stdout.splitlines() == [f"{path}: {message}"], defect
    # A damaged magic is no longer GGUF by content; the suffix still picks the GGUF reader.
    data, message = GGUF_DEFECTS["bad_magic"]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    result = scan(path)
    assert (result.returncode, result.stdout.splitlines()) == (1, [f"{path}: {message}"])


def test_scan_accepts_valid_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_mlp())
    result = scan(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{path}: accepted (GGUF v3, 4 tensors, {path.stat().st_size} bytes)"]


def test_scan_accepts_an_exported_function_by_its_version_field(tmp_path):
    import mlx.core as mx
    path = tmp_path / "graph.bin"
    mx.export_function(str(path), lambda x: x * 2, mx.zeros((1, 4)), shapeless=True)
    result = scan(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}: accepted (mlxfn, MLX {mx.__version__}, shapeless, {path.stat().st_size} bytes)"]


def test_scan_refuses_an_mlxfn_from_another_mlx(tmp_path):
    path = tmp_path / "f.mlxfn"
    path.write_bytes(struct.pack("<Q", 6) + b"0.31.0" + b"\x00" * 64)
    result = scan(path)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}: written by MLX 0.31.0; this reader knows the layout of MLX 0.32.4 only"]


def test_scan_kind_is_chosen_from_the_first_bytes():
    assert scan_kind(b"GGUF\x03\x00\x00\x00", "x.bson") == "gguf"
    assert scan_kind(struct.pack("<Q", 80) + b'{"a"', "x") == "safetensors"
    assert scan_kind(struct.pack("<Q", 6) + b"0.32.4\x01\x00", "x") == "mlxfn"
    assert scan_kind(b"\x05\x00\x00\x00\x01", "x.bson") == "bson"
    assert scan_kind(b"\x05\x00\x00\x00\x01", "x.safetensors") == "safetensors"
    assert scan_kind(b"", "model.bson") == "bson"
