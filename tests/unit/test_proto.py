"""The committed gRPC stubs are exactly what proto/generate.py makes from proto/*.proto."""
import importlib.util

import pytest

from tests.support import REPO


def test_generated_stubs_are_current(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (a test dependency)")
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {
        "inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"}
    for path in written:
        committed = REPO / "proto" / path.name
        assert committed.read_bytes() == path.read_bytes(), \
            f"proto/{path.name} is stale: run `python proto/generate.py` and commit the result"


def test_field_numbers_match_the_wire_format():
    from sealbox.proto import inference_pb2 as pb
    fields = {f.name: f.number for f in pb.ModelInferRequest.DESCRIPTOR.fields}
    assert fields == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5,
                      "outputs": 6, "raw_input_contents": 7}
    fields = {f.name: f.number for f in pb.ModelInferResponse.DESCRIPTOR.fields}
    assert fields == {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "outputs": 5,
                      "raw_output_contents": 6}
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods][:10] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"]
