"""The worker: runs inside the sandbox, the only process that parses a model.

Started by the launcher as `python -m sealbox.worker.main SPEC_JSON` (a
`WorkerSpec`, proto/contract.py). It confines itself further (Landlock, the
exec ban), loads the model from the inherited sealed file descriptors, and
serves the internal Worker gRPC service on a Unix socket in its socket
directory. Its exit codes and their meaning are in proto/contract.py.
"""
from __future__ import annotations

import runpy
import signal
import sys
import threading
from concurrent import futures

from ..proto.contract import (EXIT_BAD_SPEC, EXIT_CONFINEMENT, EXIT_MODEL_REFUSED, STDERR_PREFIX,
                                    WORKER_SERVICE, SandboxSpec, SpecError, ToolRun, WorkerSpec)


def confine(spec: SandboxSpec) -> None:
    """The worker's self-restrictions, applied before any model byte is read (steps 5-6 of the
    confinement order in sandbox/__init__.py)."""
    if spec.landlock:
        from ..sandbox import landlock
        landlock.restrict_self(read_only=list(spec.read_only), read_write=list(spec.read_write),
                               socket_dirs=list(spec.socket_dirs), symlink_dirs=list(spec.symlink_dirs))
    if spec.seccomp_stage2_fd is not None:  # built by the supervisor: no libseccomp needed here
        from ..sandbox import seccomp
        seccomp.load_stage2_from_fd(spec.seccomp_stage2_fd)


def serve(spec: WorkerSpec, engine, engine_thread: futures.ThreadPoolExecutor) -> None:
    import grpc

    from google.protobuf.message import DecodeError

    from ..proto import inference_pb2 as pb
    from ..proto import message_options, tensors
    from .engine import InferenceError, InputError

    class Worker:
        def Describe(self, request, context):
            response = pb.ModelMetadataResponse(platform=engine.platform)
            for spec_list, field in ((engine.inputs, response.inputs), (engine.outputs, response.outputs)):
                for t in spec_list:
                    field.add(name=t.name, datatype=t.datatype, shape=t.shape)
            return response

        def Infer(self, raw: bytes, context):
            # Parsed here, not by gRPC: a malformed request is the client's error, not INTERNAL.
            try:
                request = pb.ModelInferRequest.FromString(raw)
            except DecodeError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ModelInferRequest: {exc}")
            try:
                inputs = tensors.request_inputs(request)
                engine.check_inputs(inputs)
                wanted = [o.name for o in request.outputs] or list(engine.default_outputs or ())
                known = [o.name for o in engine.outputs]
                unknown = sorted(set(wanted) - set(known))
                if unknown:
                    raise InputError(f"requested outputs {unknown} do not exist (outputs: {known})")
                results = engine.infer(inputs)  # already on the engine's thread (the server's only one)
            except (InputError, tensors.TensorError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except InferenceError as exc:
                context.abort(grpc.StatusCode.INTERNAL, str(exc))
            except Exception as exc:  # an engine bug: still one clean line, not grpc's "Exception calling application"
                context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {type(exc).__name__}: {exc}")
            response = pb.ModelInferResponse(model_name=request.model_name,
                                             model_version=request.model_version, id=request.id)
            return tensors.encode_response(response, {name: results[name] for name in wanted or known})

    # The server runs every call on the engine's own thread: no hand-off per request.
    server = grpc.server(engine_thread, options=message_options(spec.model.max_message_bytes))
    worker = Worker()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(WORKER_SERVICE, {
        "Describe": grpc.unary_unary_rpc_method_handler(
            worker.Describe, request_deserializer=lambda raw: raw,
            response_serializer=pb.ModelMetadataResponse.SerializeToString),
        "Infer": grpc.unary_unary_rpc_method_handler(
            worker.Infer, request_deserializer=None, response_serializer=None),  # bytes both ways
    }),))
    server.add_insecure_port("unix:" + spec.sandbox.socket)
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    while not stopped.wait(1.0):  # polled: the signal may land on another thread (OpenBLAS's)
        pass
    server.stop(grace=1).wait()


def run_instead_of_loader(run: ToolRun) -> int:
    """`sealbox sandbox run-python` (a script) and `sealbox scan` (a module's main) run here, confined."""
    if run.kind == "script":
        sys.argv = [run.target, *run.args]
        runpy.run_path(run.target, run_name="__main__")
        return 0
    import importlib
    return importlib.import_module(run.target).main(list(run.args))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m sealbox.worker.main SPEC_JSON (started by sealboxd, not by hand)", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        spec = WorkerSpec.from_json(argv[0])
    except SpecError as exc:
        print(f"{STDERR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    files = {name: f"/proc/self/fd/{fd}" for name, fd in spec.model.files.items()}
    # Confine first, while the process has one thread (Landlock confines only the calling
    # thread; numpy and grpc start threads on import). Fail closed: nothing is read unconfined.
    try:
        confine(spec.sandbox)
    except Exception as exc:
        print(f"{STDERR_PREFIX}confinement failed: {exc}", file=sys.stderr)
        return EXIT_CONFINEMENT
    import ctypes
    import os
    for library in spec.sandbox.preload:  # global symbols: MLX's BLAS calls resolve to it
        ctypes.CDLL(library, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    from .engine import ModelError, engine_class
    if spec.run is not None:  # operator tools: a script or module in place of the model loader
        return run_instead_of_loader(spec.run)
    engine_cls = engine_class(spec.sandbox.engine)
    # One thread owns the engine: MLX streams are per thread, and engines need not be thread-safe.
    engine_thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    try:
        engine = engine_thread.submit(engine_cls.load, files, **spec.model.engine_options).result()
    except ModelError as exc:
        print(f"{STDERR_PREFIX}model refused: {exc}", file=sys.stderr, flush=True)
        # Leave at once: a parser that refused hostile bytes may have left its heap corrupt, and
        # running finalizers would turn a clean refusal into a crash at exit.
        os._exit(EXIT_MODEL_REFUSED)
    serve(spec, engine, engine_thread)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
