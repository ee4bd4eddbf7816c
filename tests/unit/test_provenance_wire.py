"""The supervisor's provenance stamp on the wire (proto.wire), checked against protobuf's own parser,
and sealbox's ModelConfig / ModelStatistics messages against tritonclient's own descriptors."""
from __future__ import annotations

import importlib.util
import json
import subprocess

import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from sealbox.proto import inference_pb2 as pb
from sealbox.proto import tensors, wire
from tests.support import PYTHON

STAMP = {"sealbox_manifest_digest": "sha256:" + "ab" * 32, "sealbox_version": "1.2",
         "sealbox_signer": "key:sha256:" + "cd" * 32}


def worker_response(parameters: dict[str, str] | None = None) -> bytes:
    """What a worker sends: a ModelInferResponse with raw outputs appended by hand (tensors.py)."""
    response = pb.ModelInferResponse(model_name="demo", id="7")
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = value
    return tensors.encode_response(response, {"y": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_string_parameters_encode_exactly_as_protobuf_does():
    ours = wire.string_parameters(wire.INFER_RESPONSE_PARAMETERS, {"sealbox_version": "1.2"})
    theirs = pb.ModelInferResponse()
    theirs.parameters["sealbox_version"].string_param = "1.2"
    assert ours == theirs.SerializeToString()
    assert wire.string_parameters(4, {}) == b""


def test_appended_entries_win_over_the_workers_own():
    forged = {"sealbox_manifest_digest": "sha256:" + "00" * 32, "sealbox_version": "9.9",
              "sealbox_signer": "key:sha256:evil", "worker_note": "kept"}
    raw = worker_response(forged)
    wire.check_complete(raw)
    stamped = raw + wire.string_parameters(wire.INFER_RESPONSE_PARAMETERS, STAMP)
    parsed = pb.ModelInferResponse.FromString(stamped)
    assert {k: v.string_param for k, v in parsed.parameters.items()} == {**STAMP, "worker_note": "kept"}
    assert parsed.id == "7" and parsed.outputs[0].name == "y"
    assert np.frombuffer(parsed.raw_output_contents[0], np.float32).tolist() == list(range(6))
    # The same through a stream response (wrapped after stamping).
    streamed = pb.ModelStreamInferResponse.FromString(wire.stream_wrap(stamped))
    assert {k: v.string_param for k, v in streamed.infer_response.parameters.items()}["sealbox_signer"] == \
        STAMP["sealbox_signer"]


@pytest.mark.parametrize("tail, why", [
    (wire.length_delimited_header(6, 200), "an open length: would swallow the stamp as raw output bytes"),
    (wire.length_delimited_header(4, 10) + b"\x0a\x03abc", "a parameters entry cut short"),
    (bytes([0x18, 0x80]), "a varint with its continuation bit set"),
    (bytes([0x19]) + b"\0" * 3, "a fixed64 cut short"),
    (bytes([0x1d]), "a fixed32 with no bytes"),
    (bytes([0x23]), "an open group (start-group wire type)"),
    (bytes([0x07]), "field number 0"),
    (bytes([0x80]), "a key cut short"),
])
def test_a_response_that_could_swallow_the_stamp_is_refused(tail, why):
    with pytest.raises(wire.PeekError):
        wire.check_complete(worker_response(STAMP) + tail)


def test_a_field_bomb_from_the_worker_is_refused_in_bounded_time():
    bomb = bytes([0x18, 0x01]) * (wire.MAX_TOP_LEVEL_FIELDS + 1)   # id-less varint fields
    with pytest.raises(wire.PeekError):
        wire.check_complete(bomb)
    wire.check_complete(bytes([0x18, 0x01]) * wire.MAX_TOP_LEVEL_FIELDS)


TRITON_DUMP = r"""
import json
from tritonclient.grpc import model_config_pb2, service_pb2
out = {}
for module in (model_config_pb2, service_pb2):
    for name, d in module.DESCRIPTOR.message_types_by_name.items():
        out[name] = {f.name: [f.number, f.type] for f in d.fields}
out["DataType"] = {v.name: v.number for v in model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values}
print(json.dumps(out))
"""


def test_config_and_statistics_messages_carry_tritons_field_numbers():
    """Every field sealbox declares has Triton's name, number and type; every Triton field it leaves
    out is reserved. Read from tritonclient's generated code, in its own process (its `inference.*`
    symbols clash with sealbox's in one process)."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient[grpc] is not installed (a test dependency)")
    triton = json.loads(subprocess.run([PYTHON, "-c", TRITON_DUMP], capture_output=True, text=True,
                                       check=True, timeout=120).stdout)
    names = ["ModelConfig", "ModelInput", "ModelOutput", "ModelParameter", "ModelConfigRequest",
             "ModelConfigResponse", "ModelStatisticsRequest", "ModelStatisticsResponse", "ModelStatistics",
             "InferStatistics", "StatisticDuration", "InferBatchStatistics", "ModelMetadataResponse",
             "ModelInferResponse", "ModelInferRequest", "InferParameter"]
    for name in names:
        descriptor = pb.DESCRIPTOR.message_types_by_name[name]
        ours = {f.name: [f.number, f.type] for f in descriptor.fields}
        extension = {"parameters"} if name == "ModelMetadataResponse" else set()
        assert {k: v for k, v in ours.items() if k not in extension} == \
            {k: v for k, v in triton[name].items() if k in ours}, name
        left_out = {v[0] for k, v in triton[name].items() if k not in ours}
        proto = descriptor_pb2.DescriptorProto()
        descriptor.CopyToProto(proto)
        reserved = {n for r in proto.reserved_range for n in range(r.start, r.end)}
        assert left_out <= reserved, (name, sorted(left_out - reserved))
    # sealbox's one addition uses a number Triton's message leaves free
    assert pb.ModelMetadataResponse.DESCRIPTOR.fields_by_name["parameters"].number not in \
        {v[0] for v in triton["ModelMetadataResponse"].values()}
    assert {v.name: v.number for v in pb.DataType.DESCRIPTOR.values} == triton["DataType"]
