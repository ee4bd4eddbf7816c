"""The public gRPC API: the Open Inference Protocol, grpc.health.v1 and reflection.

ModelInfer and ModelStreamInfer take the request as raw bytes: the
supervisor reads only the model name (and version) from the wire and
forwards the bytes to the worker, so tensors are never re-encoded here.
"""
from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import sealbox
from sealbox.daemon.supervisor import LoadRefused, ModelUnavailable, State, Supervisor
from sealbox.proto import inference_pb2 as pb
from sealbox.proto import message_options

SERVICE = "inference.GRPCInferenceService"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def peek_model(request: bytes) -> tuple[str, str]:
    """model_name (field 1) and model_version (field 2) of a serialized ModelInferRequest."""
    name = version = ""
    pos = 0
    while pos < len(request):
        key, pos = _varint(request, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(request, pos)
        elif wire == 2:
            length, pos = _varint(request, pos)
            if pos + length > len(request):
                raise ValueError("truncated field")
            if field in (1, 2):
                text = request[pos:pos + length].decode("utf-8")
                name, version = (text, version) if field == 1 else (name, text)
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != len(request):
        raise ValueError("truncated message")
    return name, version


def _stream_wrap(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response = <bytes>} built without decoding them (field 2, length-delimited)."""
    out, n = bytearray(b"\x12"), len(infer_response)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + infer_response


class InferenceService:
    def __init__(self, supervisor: Supervisor):
        self.sup = supervisor

    # -- helpers
    def _model(self, name: str, context):
        try:
            return self.sup.get(name)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")

    def _forward(self, request: bytes) -> bytes:
        """Returns the worker's response bytes; raises (code, message)."""
        try:
            name, version = peek_model(request)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ModelInferRequest: {exc}")
        if name not in self.sup.models:
            raise _Failure(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")
        model = self.sup.models[name]
        if version and version != model.version:
            raise _Failure(grpc.StatusCode.NOT_FOUND, f"model '{name}' has no version '{version}'"
                           f" (loaded: '{model.version}')")
        try:
            return self.sup.infer_raw(name, request)
        except ModelUnavailable as exc:
            raise _Failure(grpc.StatusCode.UNAVAILABLE, str(exc))
        except grpc.RpcError as exc:  # the worker's own verdict (e.g. INVALID_ARGUMENT)
            raise _Failure(exc.code(), exc.details())

    # -- the RPCs
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.sup.initial_load_done.is_set() and not self.sup.stopped.is_set())

    def ModelReady(self, request, context):
        model = self.sup.models.get(request.name)
        ready = model is not None and model.state == State.READY and request.version in ("", model.version)
        return pb.ModelReadyResponse(ready=ready)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="sealbox", version=sealbox.__version__,
                                         extensions=["model_repository", "health", "sandboxed_workers"])

    def ModelMetadata(self, request, context):
        model = self._model(request.name, context)
        metadata = model.metadata
        if model.state != State.READY or metadata is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, model.describe_state())
        if request.version and request.version != model.version:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.name}' has no version '{request.version}'"
                          f" (loaded: '{model.version}')")
        response = pb.ModelMetadataResponse()
        response.CopyFrom(metadata)
        response.name = request.name
        response.versions[:] = [model.version] if model.version else []
        return response

    def ModelInfer(self, request: bytes, context):
        try:
            return self._forward(request)
        except _Failure as failure:
            context.abort(failure.code, failure.message)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            try:
                yield _stream_wrap(self._forward(request))
            except _Failure as failure:
                yield pb.ModelStreamInferResponse(error_message=failure.message).SerializeToString()

    def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for name, model in sorted(self.sup.models.items()):
            if request.ready and model.state != State.READY:
                continue
            response.models.add(name=name, version=model.version, state=model.state.value, reason=model.reason)
        return response

    def RepositoryModelLoad(self, request, context):
        self._model(request.model_name, context)
        try:
            self.sup.load(request.model_name)
        except LoadRefused as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"model '{request.model_name}': {exc}")
        except ModelUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"model '{request.model_name}': {exc}")
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self._model(request.model_name, context)
        self.sup.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _no_shared_memory(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "sealbox does not support shared-memory tensors (system or CUDA): send tensors in the request")


class _Failure(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def _handlers(service: InferenceService) -> grpc.GenericRpcHandler:
    def unary(fn, req, resp):
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req and req.FromString,
                                                   response_serializer=resp and resp.SerializeToString)
    methods = {
        "ServerLive": unary(service.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": unary(service.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": unary(service.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": unary(service.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": unary(service.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": unary(service.ModelInfer, None, None),  # bytes in, bytes out
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(service.ModelStreamInfer),
        "RepositoryIndex": unary(service.RepositoryIndex, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
        "RepositoryModelLoad": unary(service.RepositoryModelLoad, pb.RepositoryModelLoadRequest,
                                     pb.RepositoryModelLoadResponse),
        "RepositoryModelUnload": unary(service.RepositoryModelUnload, pb.RepositoryModelUnloadRequest,
                                       pb.RepositoryModelUnloadResponse),
    }
    for prefix in ("System", "Cuda"):
        for verb in ("Status", "Register", "Unregister"):
            method = f"{prefix}SharedMemory{verb}"
            methods[method] = unary(service._no_shared_memory, getattr(pb, method + "Request"),
                                    getattr(pb, method + "Response"))
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def build_server(supervisor: Supervisor) -> tuple[grpc.Server, health.HealthServicer, list[str]]:
    cfg = supervisor.config.server
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=message_options(cfg.max_message_bytes))
    server.add_generic_rpc_handlers((_handlers(InferenceService(supervisor)),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    addresses = [f"unix:{cfg.socket}"]
    if cfg.tcp:
        addresses.append(cfg.tcp)
    for address in addresses:
        if server.add_insecure_port(address) == 0:
            raise OSError(f"cannot listen on {address}")
    for service in ("", SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health_servicer, addresses
