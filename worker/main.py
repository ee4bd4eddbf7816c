"""The worker: runs inside the sandbox, the only process that parses a model.

Started by the launcher as `python -m sealbox.worker.main SPEC_JSON` (a
`WorkerSpec`, proto/contract.py). It confines itself further (Landlock, the
exec ban), loads the model from the inherited sealed file descriptors, and
serves the hop (proto/hop.py, worker/serving.py; no gRPC) on a Unix socket in
its socket directory. Its exit codes and their meaning are in proto/contract.py.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time
from concurrent import futures

from ..proto.contract import (EXIT_BAD_SPEC, EXIT_CONFINEMENT, EXIT_MODEL_REFUSED, STDERR_PREFIX,
                              SandboxSpec, SpecError, ToolRun, WorkerSpec)


def confine(spec: SandboxSpec, stage2: bool = True) -> None:
    """The worker's self-restrictions, applied before any model byte is read (steps 5-6 of the
    confinement order in sandbox/__init__.py). A warm-pool worker applies Landlock at start and
    the engine's second seccomp stage once its model has arrived (stage2=False, then confine_stage2)."""
    if spec.landlock:
        from ..sandbox import landlock
        landlock.restrict_self(read_only=list(spec.read_only), read_write=list(spec.read_write),
                               socket_dirs=list(spec.socket_dirs), symlink_dirs=list(spec.symlink_dirs))
    if stage2:
        confine_stage2(spec)


def confine_stage2(spec: SandboxSpec) -> None:
    if spec.seccomp_stage2_fd is not None:  # built by the supervisor: no libseccomp needed here
        from ..sandbox import seccomp
        seccomp.load_stage2_from_fd(spec.seccomp_stage2_fd)   # TSYNC: every thread, started or not


def wait_for_model(socket_path: str):
    """A warm-pool worker's wait: (listener, ModelHandoff with this process's fds) from the one LOAD
    record of the first connection. Anything else ends the worker (SpecError, hop.ProtocolError)."""
    import json
    from ..proto import hop
    from ..proto.contract import handoff_from_dict
    listener = hop.listen(socket_path)
    sock, _ = listener.accept()
    try:
        body, fds = hop.recv_load(sock)
    finally:
        sock.close()
    try:
        handoff = handoff_from_dict(json.loads(body))
        if sorted(handoff.files.values()) != list(range(len(fds))):
            raise SpecError(f"the LOAD names descriptors {sorted(handoff.files.values())} for {len(fds)} attached")
    except (ValueError, SpecError):
        for fd in fds:
            os.close(fd)
        raise
    import dataclasses
    return listener, dataclasses.replace(handoff, files={name: fds[i] for name, i in handoff.files.items()})


def serve(spec: WorkerSpec, handoff, engine, engine_thread: futures.ThreadPoolExecutor, phases: dict[str, float],
          listener=None) -> None:
    """Serve the hop (worker/serving.py) until SIGTERM, every call on the engine's thread."""
    from .serving import serve as serve_hop
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    serve_hop(engine, spec.sandbox.socket, handoff.max_message_bytes, phases, engine_thread.submit, stopped,
              handoff.batching, listener)


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
    # Confine first, while the process has one thread (Landlock confines only the calling
    # thread; numpy starts threads on import). Fail closed: nothing is read unconfined.
    try:
        confine(spec.sandbox, stage2=not spec.pool)
    except Exception as exc:
        print(f"{STDERR_PREFIX}confinement failed: {exc}", file=sys.stderr)
        return EXIT_CONFINEMENT
    import ctypes
    for library in spec.sandbox.preload:  # global symbols: MLX's BLAS calls resolve to it
        ctypes.CDLL(library, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    from .engine import ModelError, engine_class
    if spec.run is not None:  # operator tools: a script or module in place of the model loader
        return run_instead_of_loader(spec.run)
    engine_cls = engine_class(spec.sandbox.engine)
    handoff, listener = spec.model, None
    if spec.pool:   # the engine imported, confined as far as it can be without a model: wait for one
        import importlib
        for module in getattr(engine_cls, "warm_imports", ()):
            importlib.import_module(module)
        try:
            listener, handoff = wait_for_model(spec.sandbox.socket)
        except Exception as exc:
            print(f"{STDERR_PREFIX}warm-pool worker: no model: {exc}", file=sys.stderr, flush=True)
            return EXIT_BAD_SPEC
        try:   # the model's seccomp stage, before any of its bytes is read
            confine_stage2(spec.sandbox)
        except Exception as exc:
            print(f"{STDERR_PREFIX}confinement failed: {exc}", file=sys.stderr)
            return EXIT_CONFINEMENT
    files = {name: f"/proc/self/fd/{fd}" for name, fd in handoff.files.items()}
    # One thread owns the engine: MLX streams are per thread, and engines need not be thread-safe.
    engine_thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    started = time.perf_counter()
    try:
        engine = engine_thread.submit(engine_cls.load, files, **handoff.engine_options).result()
    except ModelError as exc:
        print(f"{STDERR_PREFIX}model refused: {exc}", file=sys.stderr, flush=True)
        # Leave at once: a parser that refused hostile bytes may have left its heap corrupt, and
        # running finalizers would turn a clean refusal into a crash at exit.
        os._exit(EXIT_MODEL_REFUSED)
    engine.keep_freed_buffers(handoff.freed_buffer_bytes)
    batching = handoff.batching
    if batching is not None:
        from .batching import check_batchable
        try:
            check_batchable(engine, batching.max_batch_size)
        except ModelError as exc:
            print(f"{STDERR_PREFIX}model refused: {exc}", file=sys.stderr, flush=True)
            os._exit(EXIT_MODEL_REFUSED)
    phases = {"load_s": time.perf_counter() - started, **engine.load_phases}
    serve(spec, handoff, engine, engine_thread, phases, listener)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
