"""The public gRPC API on grpc.aio: the Open Inference Protocol, grpc.health.v1 and reflection.

One grpc.aio server per listener (listeners.py), all in the main thread's event loop, so an
open stream or a call waiting for a model costs a coroutine, not a thread. Each listener's
access check (roles.py) decides who may call what; admission.py bounds the cost of every
caller; every status a client sees is made by errors.py.

ModelInfer and ModelStreamInfer take the request as raw bytes: the supervisor reads only the
model name (and version) from the wire (proto.wire.peek_model, a bounded scan) and forwards the
bytes to the worker, so tensors are never re-encoded here. ModelInfer is registered as a
stream_unary handler (same wire format; unary clients work unchanged) so that admission runs
BEFORE gRPC reads the message: a refused call's body is never read.

The server uses only the supervisor's narrow interface: status(), metadata(), names(), ready(),
infer() (a coroutine on this loop), and load()/unload() in a small thread pool; and its
`metrics`, which the server feeds for every inference request (requests by status code, latency
by phase, in flight) and reads for ModelStatistics. ModelConfig is made from ModelMetadata's
served answer, so both tell the same truth (and carry the same provenance parameters).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import os
import signal
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_reflection.v1alpha import reflection

from .. import __version__
from ..proto import inference_pb2 as pb
from ..proto.wire import PeekError, shared_memory_tensors, peek_model, stream_wrap
from . import errors
from .admission import Admission, Limits, read_one
from .call_audit import CallAudit, current_caller
from .errors import ClientError
from .listeners import BindError, Listener, start_all
from .shared_memory import SharedCall, SharedMemoryRegistry
from .supervisor import LoadRefused, ModelUnavailable, State, Supervisor

log = logging.getLogger("sealboxd")
SERVICE = "inference.GRPCInferenceService"
SHUTDOWN_GRACE_S = 2   # calls in flight at SIGTERM get this long before they are cancelled


class FrontDoor:
    """The Open Inference Protocol service: admission, routing, fixed error texts."""

    def __init__(self, supervisor: Supervisor, limits: Limits, admission: Admission, audit: CallAudit):
        self.sup, self.limits, self.admission, self.audit = supervisor, limits, admission, audit
        # Blocking supervisor work (load/unload: seconds, takes model locks) runs in its own small
        # pool: it never blocks the loop and never queues behind other executor work.
        self.admin_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="admin")
        self.shm = SharedMemoryRegistry()
        self.shm_owners = {spec.name: spec.shm_owners for spec in supervisor.config.server.listeners}
        self.loop = asyncio.get_running_loop()   # made in serve(), on the loop it serves on

    # -- inference ----------------------------------------------------------------------------------
    async def _forward(self, box: list) -> bytes:
        """The answer's bytes (the worker's, stamped by the supervisor); raises ClientError.
        Measured for the metrics (and ModelStatistics) once the model is known to be configured.

        `box` holds the request's bytes: the worker hop takes them out once they are sent, so no frame
        keeps a large request alive while the worker computes (memory: about one copy per call)."""
        name, version, status = self._route(box[0])
        timing = _Timing(time.monotonic())
        with self._measured(name, status, timing):
            return await self._routed(name, version, status, box, timing)

    @contextlib.contextmanager
    def _measured(self, name: str, status, timing: "_Timing"):
        """One request in the metrics (and ModelStatistics): in flight meanwhile, then its status code
        and phases, whichever way it ends."""
        code = grpc.StatusCode.OK
        metrics = self.sup.metrics
        with metrics.inflight(name):
            try:
                yield
            except ClientError as e:
                code = e.code
                raise
            except (asyncio.CancelledError, GeneratorExit):   # the client went away
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                metrics.observe_request(name, status.version, code, timing.queue_s, timing.compute_s,
                                        time.monotonic() - timing.start)

    def _route(self, request: bytes):
        """(model name, version asked, model status) of a request; ClientError for a malformed request
        or an unknown model."""
        try:
            name, version = peek_model(request)
        except PeekError:
            raise errors.malformed() from None
        try:
            return name, version, self.sup.status(name)
        except KeyError:
            raise errors.unknown_model(name) from None

    @staticmethod
    def _check_ready(name: str, version: str, status) -> None:
        if version and version != status.version:
            raise errors.no_version(name, version, status.version)
        if status.state != State.READY:
            raise errors.unavailable(name, status.reason or status.state.value.lower())

    async def _forward_stream(self, request: bytes):
        """The answers to one ModelStreamInfer request (one or more, the last final). Several
        responses are still ONE call: one turn of the model's gate, one byte reservation, one
        request in the metrics. A client that goes away mid-stream cancels the call at the worker
        (the hop sends CANCEL and waits for the worker to end it before the turn is given back)."""
        name, version, status = self._route(request)
        try:
            if shared_memory_tensors(request):
                raise ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                                  "shared-memory tensors are served on ModelInfer, not on ModelStreamInfer")
        except PeekError:
            raise errors.malformed() from None
        timing = _Timing(time.monotonic())
        with self._measured(name, status, timing):
            self._check_ready(name, version, status)
            gate = self.admission.model(name, self.sup.calls_at_workers(name))
            with self.admission.request_bytes(gate, len(request)):
                async with gate.turn(self.limits.model_queue_timeout_s):
                    at_worker = time.monotonic()
                    timing.queue_s = at_worker - timing.start
                    try:
                        async with contextlib.aclosing(self.sup.infer_stream(name, request)) as responses:
                            del request
                            async for response in responses:
                                yield response
                    finally:
                        timing.compute_s = time.monotonic() - at_worker

    async def _routed(self, name: str, version: str, status, box: list, timing: "_Timing") -> bytes:
        """Wait for the model's turn (bounded queue), then call its worker, all in the handler's own task
        (no further task per call: each cost event-loop turns). When the client goes away, grpc.aio cancels that
        task: a call still queued leaves the queue unsent; a call at the worker is cancelled there
        (worker_hop sends CANCEL: dropped if still queued at the worker, a generation stopped at its next
        token) and the turn, the request's bytes and any shared-memory copies stay held until the
        worker has ended it (or the inference timeout has)."""
        self._check_ready(name, version, status)
        gate = self.admission.model(name, self.sup.calls_at_workers(name))
        shared = self._shared(box[0])
        try:
            # The inputs' shared-memory bytes are copied for the worker: they count as request bytes.
            with self.admission.request_bytes(gate, len(box[0]) + (shared.input_bytes if shared else 0)):
                async with gate.turn(self.limits.model_queue_timeout_s):
                    at_worker = time.monotonic()
                    timing.queue_s = at_worker - timing.start
                    try:
                        return await self.sup.infer(name, box, shared)
                    finally:
                        timing.compute_s = time.monotonic() - at_worker
        finally:
            box.clear()   # if the hop did not take the request (it failed first), it goes now
            if shared is not None:
                shared.close()

    def _shared(self, request: bytes) -> SharedCall | None:
        """The call's shared-memory tensors (regions of this caller's listener), or None."""
        try:
            refs = shared_memory_tensors(request)
        except PeekError:
            raise errors.malformed() from None
        return SharedCall(self.shm, current_caller.get().listener, refs) if refs else None

    async def ModelInfer(self, request_iterator, context):
        """Registered as STREAM_UNARY: admitted BEFORE its (up to max_message) body is read."""
        caller = current_caller.get()
        box: list = []   # the request's bytes, taken out by the hop once sent (see _forward)
        try:
            with self.admission.inference_call(caller.key, stream=False):
                request = await read_one(context, self.limits.read_timeout_s)
                if request is None:
                    raise errors.malformed()
                box.append(request)
                del request
                return await self._forward(box)
        except ClientError as e:
            code, message = e.code, e.message
        # Memory (measured): abort() raises an AbortError that grpc.aio keeps in the RPC's state.
        # Raised inside the `except` block it would chain to the ClientError, whose traceback holds
        # the frames holding the request bytes (up to the message limit) until the cyclic GC runs.
        # So: leave the except block, drop the request, then abort.
        box.clear()
        await context.abort(code, message)

    async def ModelStreamInfer(self, request_iterator, context):
        """Responses are written one by one (`_write`). A client that takes none within its time (it
        stopped reading) gets no more: the call is cancelled at the worker and the model's turn given
        back at once; the stream and its lane stay until that client takes the pending response or
        leaves (only then can a status follow it; gRPC holds the response meanwhile)."""
        caller = current_caller.get()
        failure = None
        try:
            with self.admission.inference_call(caller.key, stream=True):
                try:
                    await self._serve_stream(context)
                except _NotReading as stalled:
                    await asyncio.wait({stalled.write})   # until the client reads on or leaves
                    context.set_code(stalled.code)
                    context.set_details(stalled.message)
        except ClientError as e:
            failure = (e.code, e.message)
        if failure:
            await context.abort(*failure)

    async def _serve_stream(self, context) -> None:
        while True:
            request = await read_one(context, self.limits.stream_idle_s)   # idle timeout
            if request is None:
                return
            try:
                async with contextlib.aclosing(self._forward_stream(request)) as responses:
                    del request
                    async for response in responses:
                        await self._write(context, stream_wrap(response))
            except _NotReading:
                raise
            except ClientError as e:   # per-message errors stay in-band, as Triton does
                await self._write(context, pb.ModelStreamInferResponse(error_message=e.message).SerializeToString())

    async def _write(self, context, message: bytes) -> None:
        """One stream response, once the client's HTTP/2 window takes it. _NotReading (holding the write,
        which gRPC keeps pending) when it has not within stream_idle_s, plus the time its size takes at
        MIN_STREAM_RATE: a slow client that reads is not cut off. A client gone meanwhile ends the
        call quietly, as grpc.aio's own writes do."""
        write = asyncio.ensure_future(context.write(message))
        write.add_done_callback(_retrieved)
        await asyncio.wait({write}, timeout=self.limits.stream_idle_s + len(message) / MIN_STREAM_RATE)
        if not write.done():
            raise _NotReading(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"the client took no response for {self.limits.stream_idle_s:g} s", write)
        if write.exception() is not None:
            if context.cancelled():
                raise asyncio.CancelledError()
            raise write.exception()

    # -- health and metadata (control lane) ---------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.sup.ready())

    async def ModelReady(self, request, context):
        try:
            status = self.sup.status(request.name)
        except KeyError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=status.state == State.READY and request.version in ("", status.version))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="sealbox", version=__version__,
                                         extensions=["model_repository", "health", "sandboxed_workers"])

    async def _metadata(self, request, context) -> bytes:
        """The served ModelMetadataResponse (serialized once per load) of request.name/version, or abort."""
        failure = None
        try:
            status, metadata = self.sup.metadata(request.name)
        except KeyError:
            failure = errors.unknown_model(request.name)
        except ModelUnavailable as exc:
            failure = errors.unavailable(request.name, str(exc))
        else:
            if request.version and request.version != status.version:
                failure = errors.no_version(request.name, request.version, status.version)
        if failure:
            await context.abort(failure.code, failure.message)
        return metadata

    async def ModelMetadata(self, request, context):
        return await self._metadata(request, context)   # bytes: response_serializer=None

    async def ModelConfig(self, request, context):
        """Triton's model configuration, made from what ModelMetadata serves (so it tells the same
        truth): the engine as platform, tensors with Triton's data types and the metadata's dims
        (-1 = any size), max_batch_size 0 (the model takes whole tensors; a client batches in the
        first dimension) or, with dynamic batching, its max_batch_size, dims without the batch
        dimension and the dynamic_batching section, and the provenance parameters."""
        metadata = await self._metadata(request, context)
        return pb.ModelConfigResponse(config=model_config(pb.ModelMetadataResponse.FromString(metadata),
                                                          self.sup.get(request.name).config.batching))

    async def ModelStatistics(self, request, context):
        """Triton's per-model statistics, from the counters behind /metrics (Metrics.statistics()).
        No name: every model; no version: every version that served or is loaded."""
        if request.name:
            try:
                self.sup.status(request.name)
            except KeyError:
                failure = errors.unknown_model(request.name)
                await context.abort(failure.code, failure.message)
        stats = self.sup.metrics.statistics()
        response = pb.ModelStatisticsResponse()
        for name in [request.name] if request.name else self.sup.names():
            status = self.sup.status(name)
            versions = {v for (model, v) in stats if model == name}
            if status.state == State.READY:
                versions.add(status.version)
            if request.version:
                if request.name and request.version not in versions:
                    failure = ClientError(grpc.StatusCode.NOT_FOUND, f"model '{name}' has no statistics for "
                                          f"version '{errors.clean(request.version, 64)}'")
                    await context.abort(failure.code, failure.message)
                versions &= {request.version}
            for version in sorted(versions):
                add_statistics(response.model_stats.add(name=name, version=version), stats.get((name, version)))
        return response

    # -- model repository (admin) -------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for name in self.sup.names():
            status = self.sup.status(name)
            if request.ready and status.state != State.READY:
                continue
            response.models.add(name=name, version=status.version, state=status.state.value, reason=status.reason)
        return response

    async def _admin(self, fn, name: str):
        """Run a blocking supervisor call in the admin pool, in this call's context (so the audit
        events it writes carry the caller)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.admin_pool, contextvars.copy_context().run, fn, name)

    async def RepositoryModelLoad(self, request, context):
        name, failure = request.model_name, None
        taken = sorted(k for k in request.parameters if k == "config" or k.startswith("file:"))
        if taken:   # Triton's override config and model files: sealbox loads only what its config names
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"model '{errors.clean(name, 64)}': parameter '{errors.clean(taken[0], 64)}' refused: "
                                "sealbox never takes model bytes or config from a client; it loads the model "
                                "its configuration names")
        try:
            self.sup.status(name)
            await self._admin(self.sup.load, name)
        except KeyError:
            failure = errors.unknown_model(name)
        except LoadRefused as exc:
            failure = ClientError(grpc.StatusCode.PERMISSION_DENIED, f"model '{name}': {exc}")
        except ModelUnavailable as exc:
            failure = ClientError(grpc.StatusCode.UNAVAILABLE, f"model '{name}': {exc}")
        if failure:
            await context.abort(failure.code, failure.message)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        name = request.model_name
        try:
            self.sup.status(name)
        except KeyError:
            failure = errors.unknown_model(name)
            await context.abort(failure.code, failure.message)
        await self._admin(self.sup.unload, name)
        return pb.RepositoryModelUnloadResponse()

    # -- Triton's system shared-memory extension (daemon/shared_memory.py) -------------------------
    async def SystemSharedMemoryRegister(self, request, context):
        caller = current_caller.get()
        try:
            self.shm.register(caller.listener, self.shm_owners.get(caller.listener, frozenset()),
                              request.name, request.key, request.offset, request.byte_size)
        except ClientError as e:   # the caller hears why; not audited (a caller could flood the log)
            await context.abort(e.code, e.message)
        self.audit.event("shm_register", region=request.name, key=request.key, offset=request.offset,
                         byte_size=request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryStatus(self, request, context):
        try:
            regions = self.shm.status(current_caller.get().listener, request.name)
        except ClientError as e:
            await context.abort(e.code, e.message)
        response = pb.SystemSharedMemoryStatusResponse()
        for r in regions:
            response.regions[r.name].MergeFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return response

    async def SystemSharedMemoryUnregister(self, request, context):
        self.shm.unregister(current_caller.get().listener, request.name)
        self.audit.event("shm_unregister", region=request.name or "*")
        return pb.SystemSharedMemoryUnregisterResponse()

    async def no_cuda_shared_memory(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "sealbox has no CUDA shared memory (no GPU): use system shared memory or send tensors")

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def unary(fn, req, resp):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                       response_serializer=resp and resp.SerializeToString)
        methods = {
            "ServerLive": unary(self.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary(self.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.ModelMetadata, pb.ModelMetadataRequest, None),   # bytes made at load
            "ModelConfig": unary(self.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "ModelStatistics": unary(self.ModelStatistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
            # bytes in, bytes out; stream_unary so that admission runs before the body is read
            "ModelInfer": grpc.stream_unary_rpc_method_handler(self.ModelInfer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.ModelStreamInfer),
            "RepositoryIndex": unary(self.RepositoryIndex, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            "RepositoryModelLoad": unary(self.RepositoryModelLoad, pb.RepositoryModelLoadRequest,
                                         pb.RepositoryModelLoadResponse),
            "RepositoryModelUnload": unary(self.RepositoryModelUnload, pb.RepositoryModelUnloadRequest,
                                           pb.RepositoryModelUnloadResponse),
        }
        for verb in ("Status", "Register", "Unregister"):
            system, cuda = f"SystemSharedMemory{verb}", f"CudaSharedMemory{verb}"
            methods[system] = unary(getattr(self, system), getattr(pb, system + "Request"),
                                    getattr(pb, system + "Response"))
            methods[cuda] = unary(self.no_cuda_shared_memory, getattr(pb, cuda + "Request"),
                                  getattr(pb, cuda + "Response"))
        return grpc.method_handlers_generic_handler(SERVICE, methods)


UINT64_MAX = 2**64 - 1


MIN_STREAM_RATE = 1 << 20   # bytes/s at which a client that reads takes a stream response, at least


class _NotReading(ClientError):
    """A stream's client took no response in its time: the stream ends (never answered in-band). `write`
    is the response gRPC still holds for it."""

    def __init__(self, code, message: str, write: asyncio.Future):
        super().__init__(code, message)
        self.write = write


def _retrieved(write: asyncio.Future) -> None:
    """A write's outcome is read even if no one waits for it any more (a client gone: no asyncio warning)."""
    if not write.cancelled():
        write.exception()


class _Timing:
    """One request's phases, in seconds: queue (until its turn at the worker), compute (at the worker)."""
    __slots__ = ("start", "queue_s", "compute_s")

    def __init__(self, start: float):
        self.start, self.queue_s, self.compute_s = start, None, None


def model_config(metadata, batching=None) -> "pb.ModelConfig":
    """A Triton ModelConfig from a served ModelMetadataResponse (and the model's contract.Batching:
    then, as in Triton, dims leave out the batch dimension)."""
    skip = 1 if batching is not None else 0   # the worker refused the model unless every first dim is -1
    config = pb.ModelConfig(name=metadata.name, platform=metadata.platform,
                            max_batch_size=batching.max_batch_size if batching is not None else 0)
    if batching is not None:
        config.dynamic_batching.preferred_batch_size[:] = list(batching.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        config.dynamic_batching.preserve_ordering = True
    for tensor in metadata.inputs:
        config.input.add(name=tensor.name, data_type=_data_type(tensor.datatype), dims=list(tensor.shape)[skip:])
    for tensor in metadata.outputs:
        config.output.add(name=tensor.name, data_type=_data_type(tensor.datatype), dims=list(tensor.shape)[skip:])
    for key, value in metadata.parameters.items():
        config.parameters[key].string_value = value.string_param
    return config


def _data_type(datatype: str) -> int:
    """The protocol's datatype name -> Triton's DataType (BYTES is TYPE_STRING; unknown: TYPE_INVALID)."""
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return pb.DataType.Value(name) if name in pb.DataType.keys() else pb.TYPE_INVALID


def _duration(duration) -> "pb.StatisticDuration":
    # uint64 fields: a sum past 2**64 - 1 (a batching worker's claimed times add up) saturates
    # instead of failing every ModelStatistics call
    return pb.StatisticDuration(count=min(duration.count, UINT64_MAX), ns=min(duration.ns, UINT64_MAX))


def add_statistics(entry, stats) -> None:
    """Fill one ModelStatistics from a metrics.RequestStats (None: nothing served yet)."""
    if stats is None:
        entry.inference_stats.SetInParent()
        return
    entry.last_inference = stats.last_inference_ms
    entry.inference_count = entry.execution_count = stats.success.count   # one inference per request
    if stats.batches:   # dynamic batching: the engine calls the worker made, by rows in each
        entry.execution_count = min(sum(d.count for d in stats.batches.values()), UINT64_MAX)
    inference = entry.inference_stats
    for field in ("success", "fail", "queue", "compute_infer"):
        duration = getattr(stats, field)
        getattr(inference, field).MergeFrom(_duration(duration))
    for rows, duration in sorted(stats.batches.items()):
        entry.batch_stats.add(batch_size=rows).compute_infer.MergeFrom(_duration(duration))
    if stats.success.count and not stats.batches:   # without batching every execution is a batch of one
        batch = entry.batch_stats.add(batch_size=1)
        batch.compute_infer.MergeFrom(_duration(stats.compute_infer))


class ReadinessHealth(HealthServicer):
    """grpc.health.v1 whose overall and inference-service status is the server's readiness
    (Supervisor.ready: strict_readiness), answered at the time of the Check; Watch streams follow
    the status `serve` keeps set."""

    def __init__(self, ready):
        super().__init__()
        self._ready = ready

    async def Check(self, request, context):
        if request.service in ("", SERVICE) and not self._gracefully_shutting_down:
            serving = health_pb2.HealthCheckResponse.SERVING if self._ready() else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            return health_pb2.HealthCheckResponse(status=serving)
        return await super().Check(request, context)


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:
        log.exception("SIGHUP handling failed")


async def serve(supervisor: Supervisor, audit: CallAudit, hooks=None) -> int:
    """Bind every configured listener (all or none), serve until SIGTERM/SIGINT, stop everything.
    Returns the exit status: 0, or 2 if a listener could not be bound (nothing was served).
    `hooks` (main.ServiceHooks) hears of readiness, SIGHUP and stopping."""
    cfg = supervisor.config.server
    loop = asyncio.get_running_loop()
    admission = Admission(cfg.limits)
    door = FrontDoor(supervisor, cfg.limits, admission, audit)
    health = ReadinessHealth(supervisor.ready)

    def add_handlers(server):
        server.add_generic_rpc_handlers((door.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name, HEALTH_SERVICE,
             reflection.SERVICE_NAME), server)

    for service in ("", SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        listeners: list[Listener] = await start_all(list(cfg.listeners), cfg.limits, admission, audit, add_handlers)
    except BindError as exc:
        print(f"sealboxd: {exc}", file=sys.stderr)
        return 2
    addresses = [f"{l.spec.name}={'unix:' if l.spec.kind == 'unix' else ''}{l.bound}" for l in listeners]
    audit.event("daemon_start", config=supervisor.config.path, listen=addresses, models=sorted(supervisor.models),
                pid=os.getpid())
    log.info("listening on %s", ", ".join(addresses))

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if hooks is not None:   # on a thread: reopening files must not stall the loop
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, _quietly, hooks.sighup))
    # A daemon thread, as before: a stop during the initial loads must not wait for them.
    threading.Thread(target=supervisor.load_all, daemon=True, name="initial-load").start()

    async def mark_serving():
        while not supervisor.initial_load_done.is_set():
            await asyncio.sleep(0.05)
        for service in ("", SERVICE):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        states = ", ".join(f"{n}={supervisor.status(n).state.value}" for n in supervisor.names())
        log.info("initial loads done: %s", states)
        if hooks is not None and not stop.is_set():
            hooks.ready(states)
        serving = None
        while True:   # health Watch streams follow the readiness (Check computes it per call)
            now = supervisor.ready()
            if now != serving:
                serving = now
                status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
                for service in ("", SERVICE):
                    await health.set(service, status)
            await asyncio.sleep(0.2)

    async def housekeeping():
        while True:
            await asyncio.sleep(2)
            audit.flush()

    tasks = [asyncio.ensure_future(mark_serving()), asyncio.ensure_future(housekeeping())]
    await stop.wait()
    if hooks is not None:
        hooks.stopping()
    log.info("stopping")
    await health.enter_graceful_shutdown()
    # Calls get the grace period; then grpc.aio cancels the rest, and those at a worker end only once the
    # worker has ended them or its hop is closed: so the workers are stopped after the grace period even
    # if calls are still pending, not only once every handler has returned (a hung model would hold it).
    stopping = [asyncio.ensure_future(listener.stop(SHUTDOWN_GRACE_S)) for listener in listeners]
    await asyncio.wait(stopping, timeout=SHUTDOWN_GRACE_S + 0.5)   # normally done: no RPC (a load, say) runs on
    for task in tasks:
        task.cancel()
    await loop.run_in_executor(None, supervisor.shutdown)
    await asyncio.gather(*stopping)
    door.admin_pool.shutdown(wait=False)
    door.shm.close()
    await asyncio.sleep(0)   # let the workers' channels close on this loop
    return 0
