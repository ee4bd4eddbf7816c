"""The floor for Python gRPC: a minimal in-process ModelInfer server (no sandbox, no second hop).

`python -m benchmarks.minimal_server SOCKET MODEL_DIR`: serves ModelInfer for the echo model's MLX
function (model.mlxfn) on unix:SOCKET with grpcio's sync server and one handler thread (MLX streams
are per thread, as in a sealbox worker's one engine thread). Prints "ready" once serving.

`python -m benchmarks.minimal_server SOCKET MODEL_DIR --aio-fixed`: the floor of a grpc.aio front door
(what sealbox's supervisor is): a grpc.aio server whose ModelInfer reads the request as bytes and
returns a fixed, valid answer for a (1, 4) input without computing anything.

`python -m benchmarks.minimal_server SOCKET MODEL_DIR --aio-echo` and `--front-door-echo`: grpc.aio
servers whose ModelInfer decodes the request and answers its input as the output (the echo model's
answer, without MLX): the first as a plain unary handler, the second shaped like sealbox's front door
(ModelInfer a stream_unary handler that reads its one request, so that admission can run before the
body is read; glibc's malloc tuned as sealboxd tunes it). For 64 MiB round trips they show what a
grpc.aio server costs, and what those two choices of the front door cost, before any second process.
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

LIMIT = 256 * 2**20
OPTIONS = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]


def aio_fixed(socket_path: str) -> None:
    import asyncio
    answer = tensors.encode_response(pb.ModelInferResponse(model_name="echo"), {"y": np.ones((1, 4), np.float32)})

    async def infer(raw: bytes, context):
        return answer

    async def serve():
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        }),))
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()
    asyncio.run(serve())


def aio_echo(socket_path: str, front_door: bool) -> None:
    import asyncio

    def answer(raw: bytes) -> bytes:
        request = pb.ModelInferRequest.FromString(raw)
        x = tensors.request_inputs(request)["x"]
        return tensors.encode_response(pb.ModelInferResponse(model_name=request.model_name, id=request.id), {"y": x})

    async def unary(raw: bytes, context):
        return answer(raw)

    async def stream_unary(requests, context):
        return answer(await context.read())

    async def serve():
        server = grpc.aio.server(options=OPTIONS)
        handler = grpc.stream_unary_rpc_method_handler(stream_unary) if front_door else \
            grpc.unary_unary_rpc_method_handler(unary)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "ModelInfer": handler}),))
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()
    if front_door:
        from sealbox.daemon.admission import tune_malloc
        tune_malloc()
    asyncio.run(serve())


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

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=OPTIONS)
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
    if sys.argv[3:] == ["--aio-fixed"]:
        aio_fixed(sys.argv[1])
    elif sys.argv[3:] in (["--aio-echo"], ["--front-door-echo"]):
        aio_echo(sys.argv[1], front_door=sys.argv[3] == "--front-door-echo")
    else:
        main(*sys.argv[1:3])
