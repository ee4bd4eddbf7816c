"""The stock tritonclient[grpc] client, in its own process, against a real sealboxd."""
from __future__ import annotations

import importlib.util
import json
import subprocess

import numpy as np
import pytest

from tests.support import PYTHON, REPO
from tests.support.models import reference

# Only look for tritonclient here: importing it would clash with sealbox's own `inference.*` stubs.
if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient[grpc] is not installed (a test dependency)", allow_module_level=True)


def run_probe(target: str, model: str, admin_target: str | None = None) -> dict:
    result = subprocess.run([PYTHON, str(REPO / "tests" / "daemon" / "triton_probe.py"), target, model,
                             *([admin_target] if admin_target else [])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_tritonclient_end_to_end(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1], tcp=True).start()
    # tritonclient speaks host:port; the Unix socket works too through grpc's unix: scheme.
    out = run_probe(daemon.tcp_target, "demo", daemon.admin_target)
    assert out["live"] is True and out["ready"] is True
    assert out["server_name"] == "sealbox"
    assert out["model_inputs"] == [["x", "FP32", [-1, 4]]]
    assert out["model_outputs"] == [["y", "FP32", [-1, 3]]]
    assert out["index"] == [["demo", "READY"]]
    assert out["unknown_ready"] is False
    for key in ("batch1", "batch64", "after_reload", "typed"):
        x = np.array(out[key]["x"], np.float32)
        np.testing.assert_allclose(np.array(out[key]["y"]), reference(x), rtol=1e-5, atol=1e-5)
    assert len(out["batch64"]["y"]) == 64
    assert out["ready_after_unload"] is False and out["ready_after_load"] is True
    assert [s["error"] for s in out["stream"]] == [None, None]
    assert [s["id"] for s in out["stream"]] == ["0", "1"]
    assert [s["final"] for s in out["stream"]] == [True, True]   # one response each, so each is the last
    for s, x in zip(out["stream"], out["stream_inputs"]):
        np.testing.assert_allclose(np.array(s["y"]), reference(np.array(x, np.float32)), rtol=1e-5, atol=1e-5)
    assert out["cuda_shm"] == ["UNIMPLEMENTED", "sealbox has no CUDA shared memory (no GPU): use system shared "
                               "memory or send tensors"]
    unix = run_probe(daemon.target, "demo", daemon.admin_target)
    assert unix["index"] == [["demo", "READY"]]
