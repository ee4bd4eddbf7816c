"""The worker: runs inside the sandbox, the only process that parses a model.

Started by the launcher as `python -m sealbox.worker.main SPEC_JSON` (a
`WorkerSpec`, proto/contract.py). It confines itself further (Landlock, the
exec ban), loads the model from the inherited sealed file descriptors, and
serves the hop (proto/hop.py, worker/serving.py; no gRPC) on a Unix socket in
its socket directory. Its exit codes and their meaning are in proto/contract.py.
"""
from __future__ import annotations

import runpy
import signal
import sys
import threading
import time
from concurrent import futures

from ..proto.contract import (EXIT_BAD_SPEC, EXIT_CONFINEMENT, EXIT_MODEL_REFUSED, STDERR_PREFIX,
                              SandboxSpec, SpecError, ToolRun, WorkerSpec)


def confine(spec: SandboxSpec) -> None:
    """The worker's self-restrictions, applied before any model byte is read (steps 5-6 of the
    confinement order in sandbox/__init__.py)."""
    if spec.landlock:
        from ..sandbox import landlock
        landlock.restrict_self(read_only=list(spec.read_only), read_write=list(spec.read_write),
                               socket_dirs=list(spec.socket_dirs))
    if spec.seccomp_stage2_fd is not None:  # built by the supervisor: no libseccomp needed here
        from ..sandbox import seccomp
        seccomp.load_stage2_from_fd(spec.seccomp_stage2_fd)


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
    # thread; numpy starts threads on import). Fail closed: nothing is read unconfined.
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
    started = time.perf_counter()
    try:
        engine = engine_thread.submit(engine_cls.load, files).result()
    except ModelError as exc:
        print(f"{STDERR_PREFIX}model refused: {exc}", file=sys.stderr, flush=True)
        # Leave at once: a parser that refused hostile bytes may have left its heap corrupt, and
        # running finalizers would turn a clean refusal into a crash at exit.
        os._exit(EXIT_MODEL_REFUSED)
    batching = spec.model.batching
    if batching is not None:
        from .batching import check_batchable
        try:
            check_batchable(engine, batching.max_batch_size)
        except ModelError as exc:
            print(f"{STDERR_PREFIX}model refused: {exc}", file=sys.stderr, flush=True)
            os._exit(EXIT_MODEL_REFUSED)
    phases = {"load_s": time.perf_counter() - started, **engine.load_phases}
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    from .serving import serve
    serve(engine, spec.sandbox.socket, spec.model.max_message_bytes, phases, engine_thread.submit, stopped, batching)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
