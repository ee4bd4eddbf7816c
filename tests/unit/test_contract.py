"""The supervisor<->worker contract: one spec both sides read the same way."""
from __future__ import annotations

import json

import pytest

from sealbox.proto.contract import (ENGINE_NAMES, EXIT_REASONS, ModelHandoff, SandboxSpec, SpecError, ToolRun,
                                    WorkerSpec)
from sealbox.proto.wire import encode_varint, peek_model, read_varint, stream_wrap
from sealbox.proto import inference_pb2 as pb


def test_a_worker_spec_survives_the_trip_through_json_unchanged():
    spec = WorkerSpec(SandboxSpec(engine="mlx", read_only=("/usr", "/opt/venv"), read_write=("/tmp",),
                                  socket_dirs=("/run/sealbox",), seccomp_stage2_fd=7, preload=("/usr/lib/x.so",)),
                      ModelHandoff(files={"model.json": 5, "w.safetensors": 6}, max_message_bytes=1 << 20,
                                   freed_buffer_bytes=1 << 18),
                      ToolRun("module", "sealbox.worker.flux.scan_cli", ("--json",)))
    assert WorkerSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("text, message", [
    ("not json", "malformed worker spec"),
    ('{"sandbox": {"engine": "mlx"}}', "malformed worker spec"),
    ('{"sandbox": {"engine": "pickle"}, "model": {}}', "unknown engine 'pickle'"),
    ('{"sandbox": {"engine": "mlx", "extra": 1}, "model": {}}', "SandboxSpec: unknown keys ['extra']"),
    ('{"sandbox": {"engine": "mlx"}, "model": {"files": {"a": "5"}}}', "files must map names to file descriptors"),
    ('{"sandbox": {"engine": "mlx"}, "model": {}, "run": {"kind": "shell", "target": "x"}}',
     "unknown run kind 'shell'"),
    ('{"sandbox": {"engine": "mlx"}, "model": {}, "surprise": 1}', "unknown keys ['surprise']"),
    ('{"sandbox": {"engine": "mlx"}, "model": {"freed_buffer_bytes": -1}}', "freed_buffer_bytes must be a byte count"),
    ('{"sandbox": {"engine": "mlx"}, "model": {"freed_buffer_bytes": true}}', "freed_buffer_bytes must be a byte count"),
])
def test_a_malformed_spec_is_refused_with_its_reason(text, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        WorkerSpec.from_json(text)


def test_every_engine_name_the_config_accepts_has_a_worker_engine():
    from sealbox.worker.engine import ENGINES
    assert set(ENGINES) == set(ENGINE_NAMES)


def test_every_worker_exit_code_has_a_reason_for_the_supervisor():
    from sealbox.daemon.worker_process import describe_exit
    for code, reason in EXIT_REASONS.items():
        assert describe_exit(code) == f"exited with code {code} ({reason})"
    assert describe_exit(128 + 31) == "killed by SIGSYS (seccomp violation)"


def test_peek_model_reads_the_routing_fields_protobuf_wrote():
    request = pb.ModelInferRequest(model_name="démo", model_version="3", id="x")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    assert peek_model(request.SerializeToString()) == ("démo", "3")
    with pytest.raises(ValueError, match="truncated"):
        peek_model(request.SerializeToString()[:-1])


def test_stream_wrap_is_protobufs_own_encoding():
    inner = pb.ModelInferResponse(model_name="m", id="7").SerializeToString() + b"\x32\x03abc"
    wrapped = pb.ModelStreamInferResponse.FromString(stream_wrap(inner))
    assert wrapped.infer_response.raw_output_contents == [b"abc"]
    assert wrapped.infer_response.model_name == "m"


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32, 2**63])
def test_varints_round_trip(n):
    assert read_varint(encode_varint(n), 0) == (n, len(encode_varint(n)))


def test_spec_json_is_plain_data():
    assert json.loads(WorkerSpec(SandboxSpec(engine="flux")).to_json())["sandbox"]["engine"] == "flux"


def test_the_freed_buffers_a_worker_keeps_are_bounded_by_its_message_and_memory_limits():
    from sealbox.sandbox.launcher import worker_spec
    from sealbox.sandbox.profile import SandboxProfile
    assert SandboxProfile.for_model("mlx", max_message_bytes=256 << 20).freed_buffer_bytes == 256 << 20
    small = SandboxProfile.for_model("mlx", max_message_bytes=256 << 20, memory_bytes=512 << 20)
    assert small.freed_buffer_bytes == 128 << 20
    assert worker_spec(small, {"model.json": 3}, None, 4).model.freed_buffer_bytes == 128 << 20
