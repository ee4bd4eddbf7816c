"""Run by test_llm_serving.py in its own process (tritonclient's stubs clash with sealbox's in one process):
a stock tritonclient calls an mlx-lm model the way it calls Triton's vLLM backend, unary and streaming.
Prints one JSON object of findings."""
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as tc

url, model, prompt, max_tokens, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
client = tc.InferenceServerClient(url=url)


def inputs(stream: bool):
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    flag = tc.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream]))
    sampling = tc.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps({"max_tokens": max_tokens}).encode()], dtype=object))
    return [text, flag, sampling]


out = {}
wanted = [tc.InferRequestedOutput("text_output"), tc.InferRequestedOutput("output_ids")]
result = client.infer(model, inputs(False), outputs=wanted)
out["unary_text"] = result.as_numpy("text_output")[0].decode()
out["unary_ids"] = result.as_numpy("output_ids").tolist()
if mode == "unary":
    print(json.dumps(out))
    sys.exit(0)

responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)))
client.async_stream_infer(model, inputs(True), outputs=wanted, enable_empty_final_response=True)
pieces, ids, final, errors = [], [], False, []
while not final:
    try:
        result, error = responses.get(timeout=60)
    except queue.Empty:
        errors.append("no final response within 60 s")
        break
    if error is not None:
        errors.append(str(error))
        break
    response = result.get_response()
    final = response.parameters["triton_final_response"].bool_param if "triton_final_response" in \
        response.parameters else False
    if response.outputs:
        pieces.append(result.as_numpy("text_output")[0].decode())
        ids += result.as_numpy("output_ids").tolist()
client.stop_stream()
out.update(stream_pieces=pieces, stream_ids=ids, stream_final=final, stream_errors=errors)
print(json.dumps(out))
