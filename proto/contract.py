"""The supervisor <-> worker contract: every name and number both sides must agree on.

The launcher writes a `WorkerSpec` as the worker's single argument; the
worker reads it back; the supervisor decodes the worker's exit code with
`EXIT_REASONS`; the config checks a model's format against `ENGINE_NAMES`.
The records both sides exchange on the worker's socket are proto/hop.py.
None of them spells these values out on its own.

A spec has two parts, the way nsjail has one declarative config rendered
into every layer:
- `SandboxSpec`: what is known when a worker is spawned (its engine, its
  Landlock view, its seccomp second stage, libraries to preload);
- `ModelHandoff`: what arrives with the model (the sealed file descriptors
  of the verified bytes, per-model limits).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
from typing import Any, Mapping

# The model formats a worker can load (a model's `format` in the daemon config).
# Which module implements each is the worker's business (sealbox.worker.engine).
ENGINE_NAMES = ("mlx", "flux", "julia", "mlx-lm")

# Worker exit codes and what the supervisor reports for each.
EXIT_STOPPED = 0            # stopped by SIGTERM
EXIT_BAD_SPEC = 2
EXIT_MODEL_REFUSED = 3      # the engine refused the model (reason on stderr)
EXIT_CONFINEMENT = 4        # a confinement step failed: nothing was read unconfined
EXIT_REASONS = {
    EXIT_BAD_SPEC: "bad worker spec",
    EXIT_MODEL_REFUSED: "model refused by the engine",
    EXIT_CONFINEMENT: "sandbox confinement failed",
}

# The worker prefixes the lines it means for the supervisor with this; the last one is quoted in a death reason.
STDERR_PREFIX = "sealbox worker: "

# Where things appear inside the sandbox.
SOCKET_DIR_IN_SANDBOX = "/run/sealbox"
SOCKET_NAME = "worker.sock"

# A memfd whose size no one can change (no SIGBUS under a mapping of it): a shared-memory output arena,
# which the worker writes and the supervisor maps (daemon/shared_memory.py Arenas).
SIZE_SEALS = (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
              if hasattr(fcntl, "F_SEAL_SEAL") else 0)  # memfds are Linux-only
# Seals on every memfd handed to a worker: its bytes can never change after verification.
MEMFD_SEALS = SIZE_SEALS | fcntl.F_SEAL_WRITE if SIZE_SEALS else 0
# Seals on a shared-memory input arena (daemon/shared_memory.py Arenas): a memfd the supervisor
# reuses for one worker's inputs, call after call. F_SEAL_FUTURE_WRITE (Linux 5.1; Python's fcntl
# does not name it) lets only the mapping the supervisor made before sealing write: anyone holding
# the descriptor, the worker included, can neither write(), map it writable, mprotect a read-only
# mapping to writable, punch holes in it, nor change its size.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
ARENA_SEALS = SIZE_SEALS | F_SEAL_FUTURE_WRITE if SIZE_SEALS else 0


class SpecError(ValueError):
    """The worker's argument is not a well-formed spec (exit EXIT_BAD_SPEC)."""


@dataclasses.dataclass(frozen=True)
class SandboxSpec:
    """What a worker knows when it is spawned: how to confine itself, and its engine."""
    engine: str
    landlock: bool = True
    read_only: tuple[str, ...] = ()       # Landlock: readable paths
    read_write: tuple[str, ...] = ()      # Landlock: writable paths
    socket_dirs: tuple[str, ...] = ()     # Landlock: only a socket may be made here
    seccomp_stage2_fd: int | None = None  # the second seccomp stage, built by the supervisor
    preload: tuple[str, ...] = ()         # shared libraries loaded globally after confinement
    symlink_dirs: tuple[str, ...] = ()    # Landlock: symlinks may be made here too (mlx-lm's private model dir)
    socket: str = f"{SOCKET_DIR_IN_SANDBOX}/{SOCKET_NAME}"


@dataclasses.dataclass(frozen=True)
class Batching:
    """Dynamic batching (Triton's dynamic_batching): concurrent requests queued at the worker are run
    as one engine call of at most max_batch_size rows (first dimension) and split back, exactly."""
    max_batch_size: int
    max_queue_delay_us: int = 0               # how long the first request waits for others to join
    preferred_batch_sizes: tuple[int, ...] = ()   # a batch of one of these sizes runs at once


@dataclasses.dataclass(frozen=True)
class ModelHandoff:
    """What arrives with the model: its verified bytes as sealed fds, and per-model limits."""
    files: Mapping[str, int] = dataclasses.field(default_factory=dict)   # signed name -> inherited fd
    max_message_bytes: int = 256 * 2**20
    engine_options: Mapping[str, float] = dataclasses.field(default_factory=dict)   # e.g. mlx-lm's limits
    batching: Batching | None = None
    freed_buffer_bytes: int = 0   # what the engine may keep of what its calls free (SandboxProfile)


@dataclasses.dataclass(frozen=True)
class ToolRun:
    """An operator tool run in place of the model loader: a script path or a module's main()."""
    kind: str                  # "script" | "module"
    target: str
    args: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    sandbox: SandboxSpec
    model: ModelHandoff = dataclasses.field(default_factory=ModelHandoff)
    run: ToolRun | None = None
    # A warm-pool worker: started before its model is known, it waits on its socket for one LOAD
    # record (proto/hop.py) carrying the ModelHandoff and the model's sealed fds.
    pool: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        try:
            data = json.loads(text)
            sandbox = _build(SandboxSpec, data["sandbox"])
            model = handoff_from_dict(data["model"])
            run = None if data.get("run") is None else _build(ToolRun, data["run"])
            pool = data.get("pool", False)
            if set(data) - {"sandbox", "model", "run", "pool"} or not isinstance(pool, bool):
                raise SpecError(f"unknown keys {sorted(set(data) - {'sandbox', 'model', 'run', 'pool'})} "
                                f"or a pool flag that is not a boolean")
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise SpecError(f"malformed worker spec: {exc!r}") from None
        if sandbox.engine not in ENGINE_NAMES:
            raise SpecError(f"unknown engine {sandbox.engine!r}")
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in model.files.items()):
            raise SpecError("files must map names to file descriptors")
        if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   for k, v in model.engine_options.items()):
            raise SpecError("engine_options must map names to numbers")
        if run is not None and run.kind not in ("script", "module"):
            raise SpecError(f"unknown run kind {run.kind!r}")
        return cls(sandbox, model, run, pool)


def handoff_from_dict(data: Any) -> ModelHandoff:
    """A ModelHandoff from its JSON object (in the spec, or in a warm-pool worker's LOAD record)."""
    if not isinstance(data, dict):
        raise SpecError("ModelHandoff: not an object")
    data = dict(data)
    batching = data.pop("batching", None)
    try:
        model = _build(ModelHandoff, data)
        if batching is not None:
            model = dataclasses.replace(model, batching=_build(Batching, batching))
    except TypeError as exc:
        raise SpecError(f"malformed model handoff: {exc}") from None
    if not isinstance(model.files, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                    for k, v in model.files.items()):
        raise SpecError("files must map names to file descriptors")
    b = model.batching
    if b is not None and not (isinstance(b.max_batch_size, int) and b.max_batch_size > 0
                              and isinstance(b.max_queue_delay_us, int) and b.max_queue_delay_us >= 0
                              and all(isinstance(n, int) and 0 < n <= b.max_batch_size
                                      for n in b.preferred_batch_sizes)):
        raise SpecError(f"malformed batching {b!r}")
    if not isinstance(model.freed_buffer_bytes, int) or isinstance(model.freed_buffer_bytes, bool) \
            or model.freed_buffer_bytes < 0:
        raise SpecError(f"freed_buffer_bytes must be a byte count, not {model.freed_buffer_bytes!r}")
    return model


def _build(kind, data: Any):
    """A frozen dataclass from a JSON object: unknown keys refused, lists made tuples."""
    if not isinstance(data, dict):
        raise SpecError(f"{kind.__name__}: not an object")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(data) - names
    if unknown:
        raise SpecError(f"{kind.__name__}: unknown keys {sorted(unknown)}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
