"""JuliaEngine: refuses without Julia before importing juliacall; the scanner always runs first."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.support import SHARED

from tests.support.flux import Era, datatype, struct_
from sealbox.worker.engine import ModelError
from sealbox.worker.flux import julia_engine
from sealbox.worker.flux.native_engine import FluxNativeEngine
from sealbox.worker.flux.julia_engine import JuliaEngine

CORPUS = SHARED / "corpus" / "bsonjl"


def dense_file(tmp_path, act="relu") -> dict[str, str]:
    e = Era("0.13")
    dense = e.dense(np.ones((2, 3), np.float32), np.zeros(2, np.float32), act)[0]
    if act == "run":
        dense["data"][2] = struct_(datatype(["Main", "Base", "#run"]), [])
    path = tmp_path / "m.bson"
    path.write_bytes(e.file(dense))
    return {"m.bson": str(path)}


def test_no_julia_on_path(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHON_JULIAPKG_EXE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModelError) as err:
        JuliaEngine.load(dense_file(tmp_path))
    assert str(err.value) == ("engine julia requested but no Julia executable found at $PYTHON_JULIAPKG_EXE "
                              f"(unset) or on PATH ({tmp_path})")


def test_configured_julia_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHON_JULIAPKG_EXE", str(tmp_path / "bin" / "julia"))
    with pytest.raises(ModelError) as err:
        JuliaEngine.load(dense_file(tmp_path))
    assert str(err.value) == (f"engine julia requested but no Julia executable found at {tmp_path}/bin/julia "
                              "(from PYTHON_JULIAPKG_EXE)")


def test_refusal_does_not_import_juliacall(tmp_path):
    """In a fresh interpreter: no Julia means juliacall (which would download Julia) is never imported."""
    files = dense_file(tmp_path)
    code = (
        "import sys\n"
        "from sealbox.worker.engine import ModelError\n"
        "from sealbox.worker.flux.julia_engine import JuliaEngine\n"
        f"try:\n    JuliaEngine.load({files!r})\n"
        "except ModelError as e:\n    print('refused:', e)\n"
        "print('juliacall imported:', 'juliacall' in sys.modules)\n")
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "refused: engine julia requested but no Julia executable found at $PYTHON_JULIAPKG_EXE (unset) "
        f"or on PATH ({tmp_path})",
        "juliacall imported: False"]


def test_scanner_runs_before_julia(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHON_JULIAPKG_EXE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModelError) as err:
        JuliaEngine.load(dense_file(tmp_path, act="run"))
    assert str(err.value).startswith("m.bson: refused by the Flux scanner: model.σ: function Base.#run is not "
                                     "allowed; expected an allowed activation (")


def _julia_or_skip() -> None:
    try:
        julia_engine.find_julia()
    except ModelError as err:
        pytest.skip(f"needs Julia with BSON and Flux installed: {err}")


@pytest.mark.parametrize("name, batch", [
    ("sebkaz+Julia_Deploy/02_Docker_app_nn_model.3630b035.bson", (3, 13)),
    ("banachtech+replicator/model.6f42a183.bson", (2, 1, 28, 48)),
])
def test_julia_agrees_with_native(name, batch):
    _julia_or_skip()
    if not CORPUS.is_dir():
        pytest.skip(f"corpus not found at {CORPUS}")
    files = {"model.bson": str(CORPUS / name)}
    julia, native = JuliaEngine.load(files), FluxNativeEngine.load(files)
    assert (julia.inputs, julia.outputs) == (native.inputs, native.outputs)
    x = np.random.default_rng(3).standard_normal(batch).astype(np.float32)
    np.testing.assert_allclose(julia.infer({"input": x})["output"], native.infer({"input": x})["output"],
                               rtol=1e-4, atol=1e-5)
