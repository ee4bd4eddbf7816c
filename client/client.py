"""A Python client for sealbox: numpy in, numpy out, over the Open Inference Protocol.

    from . import Client
    with Client("unix:/run/sealbox/sealbox.sock") as c:
        outputs = c.infer("demo", {"x": np.ones((1, 4), np.float32)})

Two targets: `target` for health, metadata and inference, `admin_target` for the model
repository (models(), status(), load(), unload()), which sealboxd serves only on its admin
socket (root-only by default) or to a mutual-TLS identity holding that role. admin_target
defaults to $SEALBOX_ADMIN_TARGET, else admin.sock next to a unix: target, else
unix:/run/sealbox/admin.sock. `credentials` (grpc.ssl_channel_credentials) makes both TLS channels.

Errors are grpc.RpcError with the server's status code and message.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import grpc
import grpc.aio
import numpy as np

from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc
from ..proto import message_options, tensors

DEFAULT_TARGET = os.environ.get("SEALBOX_TARGET", "unix:/run/sealbox/sealbox.sock")
DEFAULT_ADMIN_TARGET = "unix:/run/sealbox/admin.sock"


def admin_target_for(target: str) -> str:
    """$SEALBOX_ADMIN_TARGET, else the admin socket next to a unix: target, else the default admin socket."""
    if os.environ.get("SEALBOX_ADMIN_TARGET"):
        return os.environ["SEALBOX_ADMIN_TARGET"]
    if target.startswith("unix:") and not target.startswith("unix://"):
        return "unix:" + os.path.join(os.path.dirname(target[len("unix:"):]), "admin.sock")
    return DEFAULT_ADMIN_TARGET


class StreamError(Exception):
    """An error the server sent inside a ModelStreamInfer stream (error_message), as Triton does."""


def _channel(module, target, credentials, options):
    if credentials is not None:
        return module.secure_channel(target, credentials, options=options)
    return module.insecure_channel(target, options=options)


class Client:
    def __init__(self, target: str = DEFAULT_TARGET, max_message_bytes: int = 256 * 2**20, timeout: float = 60.0,
                 admin_target: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        options = message_options(max_message_bytes)
        self.channel = _channel(grpc, target, credentials, options)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._infer_raw = self.channel.unary_unary(  # request bytes encoded by tensors.encode_request
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
            response_deserializer=pb.ModelInferResponse.FromString)
        self._stream_raw = self.channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
            response_deserializer=pb.ModelStreamInferResponse.FromString)
        self.timeout = timeout
        self.admin_target = admin_target or admin_target_for(target)
        self.admin_channel = self.channel if self.admin_target == target else \
            _channel(grpc, self.admin_target, credentials, options)
        self.admin_stub = pb_grpc.GRPCInferenceServiceStub(self.admin_channel)

    def close(self):
        self.channel.close()
        if self.admin_channel is not self.channel:
            self.admin_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- health and metadata
    def live(self) -> bool:
        return self.stub.ServerLive(pb.ServerLiveRequest(), timeout=self.timeout).live

    def ready(self) -> bool:
        return self.stub.ServerReady(pb.ServerReadyRequest(), timeout=self.timeout).ready

    def model_ready(self, name: str) -> bool:
        return self.stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=self.timeout).ready

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return self.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=self.timeout)

    def metadata(self, name: str) -> pb.ModelMetadataResponse:
        return self.stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=self.timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server answers ServerReady=true (initial model loads finished)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        import time
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError("sealbox did not become ready")
            time.sleep(0.05)

    # -- inference
    def infer(self, name: str, inputs: Mapping[str, np.ndarray], outputs: Iterable[str] | None = None,
              timeout: float | None = None) -> dict[str, np.ndarray]:
        request = tensors.encode_request(name, dict(inputs), outputs)
        response = self._infer_raw(request, timeout=timeout or self.timeout)
        return tensors.response_outputs(response)

    def generate(self, name: str, prompt: str | None = None, *, messages: list[dict] | None = None,
                 max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: list[str] | None = None, timeout: float | None = None):
        """Text from a language model (format = "mlx-lm"), piece by piece as it is generated (str each).

        One ModelStreamInfer request in Triton's vLLM-backend tensors (`text_input` or `messages`,
        `stream` = true, `sampling_parameters`); ends at the response flagged `triton_final_response`
        (Triton's decoupled convention) or when the server closes the stream. Closing the iterator early
        cancels the call: the daemon stops the generation. An error is grpc.RpcError."""
        inputs = {"stream": np.array([True])}
        if (prompt is None) == (messages is None):
            raise ValueError("generate: give a prompt or messages, not both")
        if prompt is not None:
            inputs["text_input"] = np.array([prompt.encode("utf-8")], dtype=object)
        else:
            inputs["messages"] = np.array([json.dumps(messages).encode("utf-8")], dtype=object)
        sampling = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                                      ("seed", seed), ("stop", stop)) if v is not None}
        if sampling:
            inputs["sampling_parameters"] = np.array([json.dumps(sampling).encode("utf-8")], dtype=object)
        request = tensors.encode_request(name, inputs)
        call = self._stream_raw(iter([request]), timeout=timeout or self.timeout)
        try:
            for message in call:
                if message.error_message:
                    raise StreamError(message.error_message)
                outputs = tensors.response_outputs(message.infer_response)
                if "text_output" in outputs and outputs["text_output"].size:
                    piece = outputs["text_output"].reshape(-1)[0]
                    if piece:
                        yield piece.decode("utf-8", errors="replace")
                final = message.infer_response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        finally:
            call.cancel()   # a no-op once the stream ended; stops the generation when the caller quits early

    # -- admin (over admin_target)
    def models(self) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        return list(self.admin_stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=self.timeout).models)

    def status(self, name: str) -> pb.RepositoryIndexResponse.ModelIndex:
        for model in self.models():
            if model.name == name:
                return model
        raise KeyError(f"unknown model '{name}'")

    def load(self, name: str) -> None:
        self.admin_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=self.timeout)

    def unload(self, name: str) -> None:
        self.admin_stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=self.timeout)


class AsyncClient:
    """The same calls for asyncio code (grpc.aio):

        async with AsyncClient("unix:/run/sealbox/sealbox.sock") as c:
            outputs = await c.infer("demo", {"x": x})
    """

    def __init__(self, target: str = DEFAULT_TARGET, max_message_bytes: int = 256 * 2**20, timeout: float = 60.0,
                 admin_target: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        options = message_options(max_message_bytes)
        self.channel = _channel(grpc.aio, target, credentials, options)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._infer_raw = self.channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
            response_deserializer=pb.ModelInferResponse.FromString)
        self.timeout = timeout
        self.admin_target = admin_target or admin_target_for(target)
        self.admin_channel = self.channel if self.admin_target == target else \
            _channel(grpc.aio, self.admin_target, credentials, options)
        self.admin_stub = pb_grpc.GRPCInferenceServiceStub(self.admin_channel)

    async def close(self):
        await self.channel.close()
        if self.admin_channel is not self.channel:
            await self.admin_channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def ready(self) -> bool:
        return (await self.stub.ServerReady(pb.ServerReadyRequest(), timeout=self.timeout)).ready

    async def model_ready(self, name: str) -> bool:
        return (await self.stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=self.timeout)).ready

    async def metadata(self, name: str) -> pb.ModelMetadataResponse:
        return await self.stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=self.timeout)

    async def infer(self, name: str, inputs: Mapping[str, np.ndarray], outputs: Iterable[str] | None = None,
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        request = tensors.encode_request(name, dict(inputs), outputs)
        response = await self._infer_raw(request, timeout=timeout or self.timeout)
        return tensors.response_outputs(response)

    async def models(self) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        return list((await self.admin_stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=self.timeout)).models)

    async def load(self, name: str) -> None:
        await self.admin_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=self.timeout)

    async def unload(self, name: str) -> None:
        await self.admin_stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name),
                                                    timeout=self.timeout)
