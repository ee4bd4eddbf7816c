"""The sandbox profile: the one value that decides how a worker is confined.

Everything about a worker's confinement is a field here, and
`SandboxProfile.for_model` is the one place that fills it in, for the
daemon's workers and the operator tools alike; the launcher only renders it
(bubblewrap arguments, rlimits, cgroup limits, the worker's own
self-restrictions). Changing confinement means changing this value. The
order in which its layers are applied is in sandbox/__init__.py.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import sysconfig

from ..proto.contract import Batching



def runtime_paths_for(python: str) -> tuple[str, ...]:
    """Host paths the worker's Python needs read-only: /usr, its virtualenv, and sealbox's code."""
    python = os.path.abspath(python)
    venv = os.path.dirname(os.path.dirname(python))
    paths = ["/usr"] + ([venv] if os.path.exists(os.path.join(venv, "pyvenv.cfg")) else [])
    # An editable install maps sealbox to a source tree outside the venv.
    paths.append(os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # sealbox/
    purelib = os.path.realpath(sysconfig.get_paths()["purelib"])
    out: list[str] = []
    for path in paths:
        path = os.path.realpath(path)
        if path == purelib or any(path == p or path.startswith(p + "/") for p in out):
            continue
        out.append(path)
    return tuple(out)


def find_openblas() -> str | None:
    """Debian's OpenBLAS, resolved past /etc/alternatives (the sandbox has no /etc)."""
    path = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0" if sys.platform == "linux" else ""
    real = os.path.realpath(path) if path and os.path.exists(path) else None
    return real if real and real.startswith("/usr/") else None


# mlx-lm workers (SandboxProfile.for_model): see there for why.
LLM_NOFILE = 4096
LLM_REQUEST_TIME_S = 120.0
LLM_GRACE_S = 10.0
LLM_MEMORY_BASE = 512 * 2**20


@dataclasses.dataclass(frozen=True)
class SandboxProfile:
    engine: str                       # "mlx", "flux", "julia": selects engine and syscall allowlist
    worker_user: str = "sealbox-worker"
    python: str = sys.executable      # must be executable by worker_user (not root's pyenv)
    runtime_paths: tuple[str, ...] = ()   # default: runtime_paths_for(python)
    extra_ro_paths: tuple[str, ...] = ()   # e.g. a Julia installation and depot
    tmpfs_size: int = 64 * 2**20
    memory_bytes: int = 2 * 2**30
    pids_max: int = 64
    nofile: int = 256
    fsize_bytes: int = 64 * 2**20
    max_message_bytes: int = 256 * 2**20   # the worker's hop message limit (the supervisor's, passed on)
    batching: Batching | None = None       # the model's dynamic batching, passed on (not confinement)
    load_timeout_s: float = 60.0
    infer_timeout_s: float = 30.0
    # Shared libraries the worker loads globally after confining itself, before the engine
    # (OpenBLAS: MLX's bundled reference BLAS is ~30x slower). Not LD_PRELOAD: OpenBLAS starts
    # threads when loaded, and Landlock must be applied while the worker has one thread.
    preload: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()   # engine-specific, e.g. where Julia and its depot are
    symlink_dirs: tuple[str, ...] = ()     # where the worker may make symlinks (mlx-lm: its private model dir)
    engine_options: tuple[tuple[str, float], ...] = ()   # passed to the engine's load (mlx-lm: its limits)
    # Layers beyond namespaces; each can only be turned off explicitly in the config.
    seccomp: bool = True
    landlock: bool = True
    cgroups: bool = True
    # The host's network namespace (the fetch helper only; every model worker gets a fresh, empty one).
    network: bool = False

    @property
    def freed_buffer_bytes(self) -> int:
        """Memory the engine may keep, freed by one call, for the next (Engine.keep_freed_buffers): the
        largest message, and at most a quarter of the memory limit, which it counts against."""
        return min(self.max_message_bytes, self.memory_bytes // 4)

    @classmethod
    def for_model(cls, engine: str, *, user: str = "sealbox-worker", python: str = sys.executable,
                  memory_bytes: int = 2 * 2**30, pids_max: int = 64, load_timeout_s: float = 60.0,
                  infer_timeout_s: float = 30.0, seccomp: bool = True, landlock: bool = True,
                  cgroups: bool = True, openblas: bool = True, julia: str | None = None,
                  julia_depot: str | None = None, max_message_bytes: int = 256 * 2**20,
                  engine_options: tuple[tuple[str, float], ...] = (),
                  weights_bytes: int | None = None,
                  batching: Batching | None = None) -> "SandboxProfile":
        """The profile of a worker for `engine`: the one place a worker's confinement is decided.

        The daemon passes its [workers] settings and a model's overrides; operator tools
        (`sealbox scan`, `sealbox sandbox run-python`) take the defaults, which are [workers]'s.
        """
        extra_ro: tuple[str, ...] = ()
        extra_env: tuple[tuple[str, str], ...] = ()
        if engine == "julia":  # Julia's installation and depot, read-only; nothing downloaded
            julia_root = os.path.dirname(os.path.dirname(os.path.realpath(julia))) if julia else None
            extra_ro = tuple(p for p in (julia_root, julia_depot) if p)
            extra_env = tuple((k, v) for k, v in (("PYTHON_JULIAPKG_EXE", julia),
                                                 ("JULIA_DEPOT_PATH", julia_depot)) if v)
        nofile, symlink_dirs = 256, ()
        if engine == "mlx-lm":
            # `import mlx_lm` calls setrlimit(RLIMIT_NOFILE, (2048, 4096)) and raises ValueError under a lower
            # hard limit; mlx_lm.load wants a directory: symlinks to the sealed memfds in the private /tmp.
            nofile, symlink_dirs = LLM_NOFILE, ("/tmp",)
            extra_env += (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HOME", "/tmp/hf"))
            # The per-request time budget replaces the inference timeout: the worker ends a generation at
            # the budget; the supervisor kills it only if it overruns that by LLM_GRACE_S.
            infer_timeout_s = dict(engine_options).get("request_time_s", LLM_REQUEST_TIME_S) + LLM_GRACE_S
            # Sized from the weights: MLX holds them once, plus transient copies while loading (sanitize,
            # quantization) and the interpreter with transformers; [workers]/model memory_mb is the floor.
            if weights_bytes is not None:
                memory_bytes = max(memory_bytes, LLM_MEMORY_BASE + 2 * weights_bytes)
        blas = find_openblas() if openblas else None
        return cls(engine=engine, worker_user=user, python=python, extra_ro_paths=extra_ro, extra_env=extra_env,
                   memory_bytes=memory_bytes, pids_max=pids_max, load_timeout_s=load_timeout_s,
                   infer_timeout_s=infer_timeout_s, seccomp=seccomp, landlock=landlock, cgroups=cgroups,
                   preload=(blas,) if blas else (), max_message_bytes=max_message_bytes, nofile=nofile,
                   symlink_dirs=symlink_dirs, engine_options=tuple(engine_options), batching=batching,
                   # RLIMIT_FSIZE also bounds memfds: a response leaves the worker in one (proto/hop.py),
                   # so one file may be as large as a message; /tmp's tmpfs size still bounds the disk.
                   fsize_bytes=max(64 * 2**20, max_message_bytes))

    @classmethod
    def for_fetch_helper(cls, *, user: str = "sealbox-fetch", python: str = sys.executable,
                         memory_bytes: int = 512 * 2**20, seccomp: bool = True, landlock: bool = True,
                         cgroups: bool = True) -> "SandboxProfile":
        """The fetch helper (sealbox.transfer.helper): its own uid, the host's network, and of the
        filesystem only the runtime plus what name lookups and the system CAs need, read-only.
        Its syscall allowlist is seccomp's "fetch" (inet sockets), applied by bubblewrap."""
        etc = tuple(p for p in ("/etc/ssl/certs", "/etc/ssl/openssl.cnf", "/etc/resolv.conf", "/etc/hosts",
                                "/etc/nsswitch.conf", "/etc/gai.conf") if os.path.exists(p))
        return cls(engine="fetch", worker_user=user, python=python, extra_ro_paths=etc, memory_bytes=memory_bytes,
                   pids_max=32, tmpfs_size=1 << 20, fsize_bytes=0, load_timeout_s=0, infer_timeout_s=0,
                   seccomp=seccomp, landlock=landlock, cgroups=cgroups, network=True)

    def __post_init__(self):
        if not self.runtime_paths:
            object.__setattr__(self, "runtime_paths", runtime_paths_for(self.python))

    def worker_environment(self) -> dict[str, str]:
        """The worker's whole environment (bubblewrap starts it with --clearenv)."""
        from .limits import WORKER_ENVIRONMENT  # what seccomp's allowlist assumes
        return {
            **WORKER_ENVIRONMENT,
            "PATH": "/usr/bin:/bin",
            "TMPDIR": "/tmp",               # private tmpfs: MLX's kernel cache can't be poisoned across workers
            "PYTHON_JULIAPKG_OFFLINE": "yes",
            **dict(self.extra_env),
        }
