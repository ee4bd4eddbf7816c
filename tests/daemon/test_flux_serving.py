"""End to end: a real Flux model from the corpus, signed upstream, served by sealboxd, called by tritonclient."""
from __future__ import annotations

import json
import shutil
import subprocess

import grpc
import numpy as np
import pytest

from tests.support import PYTHON, REPO, require_shared
from tests.support.pki import upstream_sign

CORPUS_MODEL = "sebkaz+Julia_Deploy/02_Docker_app_nn_model.3630b035.bson"   # Chain(Dense(13=>42, relu), Dense(42=>1))
CLOSURE_MODEL = "DhairyaLGandhi+JuliaCon2020_dash/model_conv.7d17a1f4.bson"


def signed_flux_model(directory, source, keys):
    directory.mkdir(parents=True)
    shutil.copyfile(source, directory / "model.bson")
    upstream_sign(directory, keys[0])
    return directory


def test_corpus_flux_model_through_tritonclient(tmp_path, daemon_factory, keys, demo_model):
    corpus = require_shared("corpus/bsonjl")
    good = signed_flux_model(tmp_path / "models" / "house", corpus / CORPUS_MODEL, keys)
    closure = signed_flux_model(tmp_path / "models" / "closure", corpus / CLOSURE_MODEL, keys)
    daemon = daemon_factory({"house": {"path": good, "format": "flux"},
                             "closure": {"path": closure, "format": "flux"},
                             "demo": {"path": demo_model}}, keys[1], tcp=True).start()
    result = subprocess.run([PYTHON, str(REPO / "tests" / "daemon" / "triton_probe.py"), daemon.tcp_target, "house",
                             daemon.admin_target],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["model_inputs"] == [["input", "FP32", [-1, 13]]]
    assert out["model_outputs"] == [["output", "FP32", [-1, 1]]]
    # The same file evaluated in-process by the native evaluator (the worker's answer must match it).
    from sealbox.worker.flux.native_engine import FluxNativeEngine
    engine = FluxNativeEngine.load({"model.bson": str(good / "model.bson")})
    for key in ("batch1", "batch64", "typed"):
        x = np.array(out[key]["x"], np.float32)
        np.testing.assert_allclose(np.array(out[key]["y"]), engine.infer({"input": x})["output"], rtol=1e-5, atol=1e-5)
    # The model with a serialized closure is refused by the scanner inside the worker; nothing is served.
    index = dict((name, state) for name, state in out["index"])
    assert index == {"closure": "UNAVAILABLE", "demo": "READY", "house": "READY"}
    with daemon.client() as client:
        status = client.status("closure")
        assert "model refused by the engine" in status.reason
        assert "serialized closure (jl_anonymous)" in status.reason
        with pytest.raises(grpc.RpcError) as err:
            client.infer("closure", {"input": np.zeros((1, 1, 28, 28), np.float32)})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
