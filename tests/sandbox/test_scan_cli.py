"""`sealbox scan`: the scanner's verdict, computed inside a worker sandbox."""
import json
import pathlib
import subprocess

from tests.support import PYTHON, require_shared

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
