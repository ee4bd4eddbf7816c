"""The floor for Python gRPC: a minimal in-process ModelInfer server (no sandbox, no second hop).

`python -m benchmarks.minimal_server SOCKET MODEL_DIR`: serves ModelInfer for the echo model's MLX
function (model.mlxfn) on unix:SOCKET with grpcio's sync server and one handler thread (MLX streams
are per thread, as in a sealbox worker's one engine thread). Prints "ready" once serving.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from concurrent import futures

import grpc
import mlx.core as mx
import numpy as np

from sealbox.proto import inference_pb2 as pb
from sealbox.proto import tensors


def main(socket_path: str, model_dir: str) -> None:
    loaded = {}

    def infer(raw: bytes, context):
        if "fn" not in loaded:   # on the handler thread: MLX streams belong to the thread that made them
            loaded["fn"] = mx.import_function(os.path.join(model_dir, "model.mlxfn"))
        fn = loaded["fn"]
        request = pb.ModelInferRequest.FromString(raw)
        x = tensors.request_inputs(request)["x"]
        out = fn(mx.array(x))[0]
        mx.eval(out)
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        return tensors.encode_response(response, {"y": np.array(out, copy=False)})

    limit = 256 * 2**20
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1),
                         options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer, request_deserializer=None, response_serializer=None),
    }),))
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
