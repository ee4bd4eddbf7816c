"""Run by test_provenance_and_stats.py in its own process (tritonclient's stubs clash with sealbox's):
provenance parameters on ModelInfer and ModelStreamInfer answers, ModelMetadata (as bytes: its
sealbox field 6 is unknown to tritonclient), ModelConfig and ModelStatistics, all through stock
tritonclient. Prints one JSON object."""
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

url, admin_url, model = sys.argv[1], sys.argv[2], sys.argv[3]
calls = int(sys.argv[4]) if len(sys.argv) > 4 else 3
client = tc.InferenceServerClient(url=url)
admin = tc.InferenceServerClient(url=admin_url)
out = {}


def parameters(response) -> dict:
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in response.parameters.items()}


def request(batch, request_id=""):
    inp = tc.InferInput("x", [batch, 4], "FP32")
    inp.set_data_from_numpy(np.ones((batch, 4), np.float32))
    return inp


out["infer"] = []
for i in range(calls):
    result = client.infer(model, [request(i + 1)], request_id=str(i))
    out["infer"].append({"parameters": parameters(result.get_response()), "shape": list(result.as_numpy("y").shape)})
try:
    client.infer(model, [request(2)], request_id="swallow")
    out["swallow"] = None
except InferenceServerException as exc:
    out["swallow"] = [exc.status(), exc.message()]
try:   # a failure the metrics count: wrong shape
    bad = tc.InferInput("x", [2, 5], "FP32")
    bad.set_data_from_numpy(np.ones((2, 5), np.float32))
    client.infer(model, [bad])
except InferenceServerException as exc:
    out["bad_shape"] = exc.status()

results = queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)))
client.async_stream_infer(model, [request(2)], request_id="s0")
result, error = results.get(timeout=30)
client.stop_stream()
out["stream"] = {"error": str(error) if error else None,
                 "parameters": parameters(result.get_response()) if result else None}

out["metadata_hex"] = client.get_model_metadata(model).SerializeToString().hex()
out["config"] = client.get_model_config(model, as_json=True)["config"]
out["statistics"] = admin.get_inference_statistics(model, as_json=True)
out["all_statistics"] = admin.get_inference_statistics(as_json=True)
try:
    client.get_inference_statistics(model)
except InferenceServerException as exc:
    out["statistics_on_inference_socket"] = exc.status()
print(json.dumps(out))
