"""Provenance on every answer, request metrics, ModelStatistics and ModelConfig, against a real
sealboxd through stock tritonclient (in its own process) and a real HTTP client."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import urllib.request
import uuid

import pytest

from sealbox.daemon.provenance import Provenance
from sealbox.proto import inference_pb2 as pb
from tests.support import PYTHON, REPO
from tests.support.pki import sealbox_cli

if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient[grpc] is not installed (a test dependency)", allow_module_level=True)

NAMES = ("sealbox_manifest_digest", "sealbox_version", "sealbox_signer")


def probe(daemon, model="demo", calls=3) -> dict:
    result = subprocess.run([PYTHON, str(REPO / "tests" / "daemon" / "triton_ops_probe.py"), daemon.tcp_target,
                             daemon.admin_target, model, str(calls)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def released_model(demo_model, keys, tmp_path):
    """The demo model signed by sealbox with a release statement (version 1.2 for model 'demo'), and
    what `sealbox verify` prints for it: {"digest", "signer", "version"}."""
    path = tmp_path / "models" / "demo"
    shutil.copytree(demo_model, path)
    (path / "model.sig").unlink()
    signed = sealbox_cli("sign", "key", path, "--private-key", keys[0], "--version", "1.2", "--model-name", "demo")
    assert signed.returncode == 0, signed.stderr
    verified = sealbox_cli("verify", path, "--signature", path / "model.sig", "--public-key", keys[1])
    assert verified.returncode == 0, verified.stderr
    found = re.fullmatch(r"verified: \d+ files, (sha256:[0-9a-f]{64}), signer (\S+), version (\S+)\n", verified.stdout)
    assert found, verified.stdout
    return path, dict(zip(("digest", "signer", "version"), found.groups()))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        return answer.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        metric, _, number = line.rpartition(" ")
        if metric.split("{")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', metric))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(number)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_provenance_config_statistics_and_metrics_through_tritonclient(daemon_factory, released_model, keys):
    path, verified = released_model
    port = free_port()
    daemon = daemon_factory({"demo": {"path": path}}, keys[1], tcp=True,
                            server=f'metrics = "127.0.0.1:{port}"').start()
    before = scrape(port)
    assert sample(before, "sealbox_requests_total", model="demo") is None
    out = probe(daemon)
    expected = {"sealbox_manifest_digest": verified["digest"], "sealbox_version": verified["version"],
                "sealbox_signer": verified["signer"]}
    assert verified["version"] == "1.2" and verified["signer"].startswith("key:sha256:")

    # Provenance: on every answer, unary and streamed, equal to what `sealbox verify` printed.
    assert [call["parameters"] for call in out["infer"]] == [expected] * 3
    assert [call["shape"] for call in out["infer"]] == [[1, 3], [2, 3], [3, 3]]
    # a stream's (last) response also says it is the last one (Triton's decoupled convention)
    assert out["stream"] == {"error": None, "parameters": {**expected, "triton_final_response": True}}
    assert out["swallow"] is None   # the honest worker's "swallow" request is just a request
    metadata = pb.ModelMetadataResponse.FromString(bytes.fromhex(out["metadata_hex"]))
    assert {k: v.string_param for k, v in metadata.parameters.items()} == expected
    assert list(metadata.versions) == ["1.2"]
    # ... and the audit log's load event carries the same values.
    load = [e for e in daemon.audit_events() if e["event"] == "model_load" and e.get("verdict") == "ready"][-1]
    assert (load["manifest_digest"], load["version"], load["signer"]) == \
        (verified["digest"], verified["version"], verified["signer"])

    # ModelConfig: Triton's shape, truthful.
    config = out["config"]
    assert config["name"] == "demo" and config["platform"] == "mlx"
    assert config.get("max_batch_size", 0) == 0
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "4"]}]
    assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": ["-1", "3"]}]
    assert config["parameters"] == {k: {"string_value": v} for k, v in expected.items()}

    # ModelStatistics: the same counters (4 successes: 3 calls + "swallow"; 1 stream message; 1 failure).
    [stats] = out["statistics"]["model_stats"]
    assert stats["name"] == "demo" and stats["version"] == "1.2"
    assert stats["inference_count"] == stats["execution_count"] == "5"
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == inference["queue"]["count"] == inference["compute_infer"]["count"] == "5"
    assert inference["fail"]["count"] == "1"
    assert int(inference["success"]["ns"]) >= int(inference["compute_infer"]["ns"]) > 0
    assert int(stats["last_inference"]) > 0
    assert stats["batch_stats"] == [{"batch_size": "1", "compute_infer": inference["compute_infer"]}]
    assert [s["name"] for s in out["all_statistics"]["model_stats"]] == ["demo"]
    assert out["statistics_on_inference_socket"] == "StatusCode.PERMISSION_DENIED"   # the statistics role

    # /metrics over HTTP: the request counters moved with the real calls.
    after = scrape(port)
    assert sample(after, "sealbox_requests_total", model="demo", version="1.2", code="OK") == 5
    assert sample(after, "sealbox_requests_total", model="demo", version="1.2", code="INVALID_ARGUMENT") == 1
    for phase in ("queue", "compute"):
        assert sample(after, "sealbox_request_duration_seconds_count", model="demo", version="1.2", phase=phase) == 6
    assert sample(after, "sealbox_request_duration_seconds_count", model="demo", version="1.2", phase="total") == 6
    assert sample(after, "sealbox_requests_in_flight", model="demo") == 0

    # The root daemon, having served, has loaded no engine (nor psutil, a test dependency): the
    # shared libraries it maps come from none of those packages.
    mapped = {line.split("site-packages/")[1].split("/")[0] for line in
              pathlib.Path(f"/proc/{daemon.proc.pid}/maps").read_text().splitlines() if "site-packages/" in line}
    assert mapped and not {m for m in mapped if m.startswith(("mlx", "juliacall", "juliapkg", "psutil", "numpy"))}


@pytest.fixture
def hostile_python(released_model):
    """A worker interpreter that runs the real worker, but whose every answer also carries forged
    provenance parameters (set in the message AND appended as entries after it); for request id
    "swallow" it then opens a raw_output_contents field exactly as long as the supervisor's stamp, so
    that, appended blindly, the stamp would become output bytes and the forged entries would stand.
    It lives in the venv's bin/ so the sandbox's read-only view (the venv) holds it."""
    _, verified = released_model
    stamp = Provenance(verified["digest"], verified["version"], verified["signer"]).stamp()
    script = pathlib.Path(PYTHON).parent / f"sealbox-test-hostile-{uuid.uuid4().hex[:8]}"
    script.write_text(f"""#!{PYTHON}
import sys
FORGED = {{"sealbox_manifest_digest": "sha256:" + "0" * 64, "sealbox_version": "6.6.6",
          "sealbox_signer": "key:sha256:forged"}}
if sys.argv[1] == "-c":   # the daemon's start-up check: python -c "import sealbox.worker.main"
    exec(sys.argv[2])
    sys.exit(0)
import sealbox.worker.main as worker   # light: no thread may start before the worker confines itself
serve = worker.serve
def hostile_serve(*args):   # called confined, with the model loaded
    from sealbox.proto import tensors, wire
    parts = tensors.response_parts
    def response_parts(response, outputs, in_shm=frozenset()):
        for key, value in FORGED.items():
            response.parameters[key].string_param = value
        raw = parts(response, outputs, in_shm) + [wire.string_parameters(wire.INFER_RESPONSE_PARAMETERS, FORGED)]
        if response.id == "swallow":
            raw.append(wire.length_delimited_header(wire.RAW_OUTPUT_FIELD, {len(stamp)}))
        return raw
    tensors.response_parts = response_parts
    return serve(*args)
worker.serve = hostile_serve
sys.exit(worker.main(sys.argv[3:]))   # argv: SCRIPT -m sealbox.worker.main SPEC
""")
    os.chmod(script, 0o755)
    yield script
    script.unlink()


def test_a_worker_cannot_forge_the_provenance(daemon_factory, released_model, keys, hostile_python):
    path, verified = released_model
    daemon = daemon_factory({"demo": {"path": path}}, keys[1], tcp=True,
                            workers=f'python = "{hostile_python}"').start()
    out = probe(daemon, calls=2)
    expected = {"sealbox_manifest_digest": verified["digest"], "sealbox_version": verified["version"],
                "sealbox_signer": verified["signer"]}
    assert [call["parameters"] for call in out["infer"]] == [expected] * 2
    # a stream's (last) response also says it is the last one (Triton's decoupled convention)
    assert out["stream"] == {"error": None, "parameters": {**expected, "triton_final_response": True}}
    # The response that would have swallowed the stamp never reaches the client.
    assert out["swallow"] == ["StatusCode.INTERNAL", "model 'demo' failed"]
    metadata = pb.ModelMetadataResponse.FromString(bytes.fromhex(out["metadata_hex"]))
    assert {k: v.string_param for k, v in metadata.parameters.items()} == expected
    assert out["config"]["parameters"] == {k: {"string_value": v} for k, v in expected.items()}
