"""Per-process resource limits for a worker, and the environment it must run with."""
from __future__ import annotations

import resource

# Environment every worker needs, whatever its profile; each line says why (SECURITY.md, "environment").
WORKER_ENVIRONMENT = {
    "GRPC_ENABLE_FORK_SUPPORT": "0",  # with fork support a failed fork() (pids limit) hangs the gRPC server
    "MALLOC_ARENA_MAX": "2",          # one 64 MiB malloc arena per thread otherwise: address space balloons
    "MLX_DISABLE_COMPILE": "1",       # no g++ at run time: exec is forbidden and its kernel cache is shared
    "PYTHONDONTWRITEBYTECODE": "1",   # no __pycache__ writes: the code is read-only and mkdir is not allowed
    "PYTHONNOUSERSITE": "1",          # no user site-packages from the worker's writable tmpfs
    "HOME": "/tmp",                   # site derives the user site from $HOME even when disabled; without
                                      # it asks pwd (getuid, then the nscd socket): seccomp kills that
}


def apply_rlimits(nofile: int, fsize: int, core: int = 0, address_space: int | None = None) -> None:
    """Set hard and soft limits on the calling process. Safe in a preexec_fn: no allocation to speak of.

    Call it before dropping root: an unprivileged process could not raise a
    limit later, and neither can the worker (soft == hard).
    """
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (core, core))
    if address_space is not None:  # fragile with gRPC's per-thread reservations: prefer the cgroup limit
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
