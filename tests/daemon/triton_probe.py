"""Run by test_tritonclient.py in its own process: tritonclient's generated stubs and
protobuf pin clash with sealbox's in one process. Prints one JSON object of findings."""
import json
import sys

import grpc
import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc

url, model = sys.argv[1], sys.argv[2]
admin_url = sys.argv[3] if len(sys.argv) > 3 else url   # the model repository calls (sealbox: admin socket)
out = {}
client = tc.InferenceServerClient(url=url)
admin = tc.InferenceServerClient(url=admin_url)
out["live"] = client.is_server_live()
out["ready"] = client.is_server_ready()
meta = client.get_server_metadata()
out["server_name"] = meta.name
mm = client.get_model_metadata(model)
out["model_inputs"] = [[t.name, t.datatype, list(t.shape)] for t in mm.inputs]
out["model_outputs"] = [[t.name, t.datatype, list(t.shape)] for t in mm.outputs]
out["index"] = [[m.name, m.state] for m in admin.get_model_repository_index().models]
out["unknown_ready"] = client.is_model_ready("no-such-model")
in_name, in_dtype, in_shape = out["model_inputs"][0]
out_name = out["model_outputs"][0][0]
feature_shape = in_shape[1:]


def infer(batch):
    x = np.random.default_rng(batch).standard_normal([batch, *feature_shape]).astype(np.float32)
    inp = tc.InferInput(in_name, list(x.shape), in_dtype)
    inp.set_data_from_numpy(x)  # raw contents
    result = client.infer(model, [inp], outputs=[tc.InferRequestedOutput(out_name)])
    return x, result.as_numpy(out_name)


for batch in (1, 64):
    x, y = infer(batch)
    out[f"batch{batch}"] = {"x": x.tolist(), "y": y.tolist()}

admin.unload_model(model)
out["ready_after_unload"] = client.is_model_ready(model)
admin.load_model(model)
out["ready_after_load"] = client.is_model_ready(model)
x, y = infer(3)
out["after_reload"] = {"x": x.tolist(), "y": y.tolist()}

# ModelStreamInfer: two requests, two responses, in order.
import queue
results = queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)))
stream_inputs = []
for i, batch in enumerate((2, 5)):
    x = np.full([batch, *feature_shape], float(i), np.float32)
    inp = tc.InferInput(in_name, list(x.shape), in_dtype)
    inp.set_data_from_numpy(x)
    client.async_stream_infer(model, [inp], request_id=str(i))
    stream_inputs.append(x)
stream = []
for _ in range(2):
    result, error = results.get(timeout=30)
    stream.append({"error": str(error) if error else None,
                   "id": result.get_response().id if result else None,
                   # Triton's decoupled convention: the last response of a request says so
                   "final": result.get_response().parameters["triton_final_response"].bool_param if result else None,
                   "y": result.as_numpy(out_name).tolist() if result else None})
client.stop_stream()
out["stream"] = stream
out["stream_inputs"] = [x.tolist() for x in stream_inputs]

# A typed-contents request (fp32_contents) built by hand with tritonclient's own messages.
channel = grpc.insecure_channel(url)
stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
x = np.arange(2 * int(np.prod(feature_shape)), dtype=np.float32).reshape([2, *feature_shape]) / 10
request = service_pb2.ModelInferRequest(model_name=model)
tensor = request.inputs.add(name=in_name, datatype="FP32", shape=list(x.shape))
tensor.contents.fp32_contents.extend(x.ravel().tolist())
response = stub.ModelInfer(request)
out["typed"] = {"x": x.tolist(), "y": np.frombuffer(response.raw_output_contents[0], np.float32)
                .reshape(list(response.outputs[0].shape)).tolist()}
try:
    stub.CudaSharedMemoryStatus(service_pb2.CudaSharedMemoryStatusRequest())
except grpc.RpcError as exc:
    out["cuda_shm"] = [exc.code().name, exc.details()]
print(json.dumps(out))
