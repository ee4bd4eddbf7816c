"""`sealbox scan`: verdicts, exit codes, JSON."""
from __future__ import annotations

import json

import numpy as np

from tests.support.flux import Era, datatype, struct_
from sealbox.worker.flux.scan_cli import main


def write(tmp_path, gadget=False):
    e = Era("0.13")
    dense = e.dense(np.ones((2, 3), np.float32), np.zeros(2, np.float32), "relu")[0]
    if gadget:
        dense["data"][2] = struct_(datatype(["Main", "Base", "#run"]), [])
    path = tmp_path / "m.bson"
    path.write_bytes(e.file(e.chain([(dense, dense["type"]), e.function("softmax")])))
    return path


def test_accepted(tmp_path, capsys):
    path = write(tmp_path)
    assert main([str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: accepted (Flux model under key 'model')",
        "  model.layers[1]: Dense(3 => 2, relu)",
        "  model.layers[2]: softmax",
        "  input [-1, 3] FP32 -> output [-1, 2] FP32"]


def test_accepted_json(tmp_path, capsys):
    path = write(tmp_path)
    assert main([str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "accepted" and out["reasons"] == []
    assert out["model"]["input"] == {"name": "input", "datatype": "FP32", "shape": [-1, 3]}
    assert out["model"]["output"] == {"name": "output", "datatype": "FP32", "shape": [-1, 2]}
    assert [layer["summary"] for layer in out["model"]["layers"]] == ["Dense(3 => 2, relu)", "softmax"]


def test_refused(tmp_path, capsys):
    path = write(tmp_path, gadget=True)
    assert main([str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: refused"
    assert lines[1].startswith("  model.layers[1].σ: function Base.#run is not allowed; expected an allowed activation")
    assert main([str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "refused" and out["reasons"][0]["place"] == "model.layers[1].σ" and "model" not in out


def test_not_a_model(tmp_path, capsys):
    path = tmp_path / "w.bson"
    path.write_bytes(Era("0.13").file(Era("0.13").array(np.zeros((2, 2), np.float32)), key="w"))
    assert main([str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: not-a-model",
        "  top: no Flux model at the top level (keys: w): weights or other data only"]


def test_usage_and_io_errors(tmp_path, capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: sealbox scan [-h] [--json] [--name NAME] file\n")
    assert main([str(tmp_path / "missing.bson")]) == 2
    assert capsys.readouterr().err == f"sealbox scan: {tmp_path}/missing.bson: No such file or directory\n"
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"sealbox scan: {tmp_path}: Is a directory\n"
    assert main(["--help"]) == 0


def test_name_reported_instead_of_the_path(tmp_path, capsys):
    """The sandboxed scan sees /proc/self/fd/N; --name reports the user's file name."""
    path = write(tmp_path, gadget=True)
    assert main([str(path), "--name", "models/m.bson"]) == 1
    assert capsys.readouterr().out.splitlines()[0] == "models/m.bson: refused"
