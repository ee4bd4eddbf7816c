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
from sealbox.proto.wire import peek_model, stream_wrap

SERVICE = "inference.GRPCInferenceService"


class InferenceService:
    def __init__(self, supervisor: Supervisor):
        self.sup = supervisor

    # -- helpers
    def _status(self, name: str, context):
        try:
            return self.sup.status(name)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")

    def _forward(self, request: bytes) -> bytes:
        """Returns the worker's response bytes; raises (code, message)."""
        try:
            name, version = peek_model(request)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ModelInferRequest: {exc}")
        try:
            status = self.sup.status(name)
        except KeyError:
            raise _Failure(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'") from None
        if version and version != status.version:
            raise _Failure(grpc.StatusCode.NOT_FOUND, f"model '{name}' has no version '{version}'"
                           f" (loaded: '{status.version}')")
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
        return pb.ServerReadyResponse(ready=self.sup.ready())

    def ModelReady(self, request, context):
        try:
            status = self.sup.status(request.name)
        except KeyError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=status.state == State.READY and request.version in ("", status.version))

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="sealbox", version=sealbox.__version__,
                                         extensions=["model_repository", "health", "sandboxed_workers"])

    def ModelMetadata(self, request, context):
        self._status(request.name, context)
        try:
            status, metadata = self.sup.metadata(request.name)
        except ModelUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if request.version and request.version != status.version:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.name}' has no version '{request.version}'"
                          f" (loaded: '{status.version}')")
        response = pb.ModelMetadataResponse()
        response.CopyFrom(metadata)
        response.name = request.name
        response.versions[:] = [status.version] if status.version else []
        return response

    def ModelInfer(self, request: bytes, context):
        try:
            return self._forward(request)
        except _Failure as failure:
            context.abort(failure.code, failure.message)

    def ModelStreamInfer(self, request_iterator, context):
        for request in request_iterator:
            try:
                yield stream_wrap(self._forward(request))
            except _Failure as failure:
                yield pb.ModelStreamInferResponse(error_message=failure.message).SerializeToString()

    def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for name in self.sup.names():
            status = self.sup.status(name)
            if request.ready and status.state != State.READY:
                continue
            response.models.add(name=name, version=status.version, state=status.state.value, reason=status.reason)
        return response

    def RepositoryModelLoad(self, request, context):
        self._status(request.model_name, context)
        try:
            self.sup.load(request.model_name)
        except LoadRefused as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"model '{request.model_name}': {exc}")
        except ModelUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"model '{request.model_name}': {exc}")
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self._status(request.model_name, context)
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
