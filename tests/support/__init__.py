"""Test support: shared by the test suite and the benchmarks (never installed with sealbox).

| module | what it holds |
|---|---|
| __init__.py | paths: the repository, ../shared beside it, the interpreter under test, the test run dir |
| pki.py | real keys and certificate chains, models on disk, the upstream `model_signing` tool, our publisher CLI |
| daemon.py | `Daemon`: a real sealboxd in a subprocess, its config written from a few arguments |
| models.py | reference computations and helpers for models served in tests |
| flux.py | BSON.jl encodings of Flux models, built in the tests |
| formats.py | malformed safetensors, GGUF and .mlxfn files, generated |
| https.py | `Nginx`: a real HTTPS server on loopback with a test CA (transfer tests) |
| registry.py | `Registry`: Debian's docker-registry with TLS, pushing through the `oras` SDK |
| sshd.py | `Sshd`: Debian's openssh-server for SFTP, a test host key and a key-only test user |
| frontdoor.py | unprivileged users, test PKI for mutual TLS, raw requests for the front-door tests |
"""
from __future__ import annotations

import pathlib
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
PYTHON = sys.executable
MODEL_SIGNING = str(pathlib.Path(PYTHON).with_name("model_signing"))
# Worker socket dirs must be reachable by the worker uid (pytest's tmp_path is 0700 under /tmp).
RUN_ROOT = "/run/sealbox-test"


def require_shared(sub: str) -> pathlib.Path:
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"{path} is absent (CI provides ../shared beside the clone)")
    return path


def needs_shared():
    return pytest.mark.skipif(not (SHARED / "interop" / "model-transparency-test-vectors.json").exists(),
                              reason=f"{SHARED} (upstream test vectors) is absent")


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.05):
    """predicate()'s first truthy value, polled every `interval` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
