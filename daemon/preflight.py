"""Start-up checks: refuse to run when workers cannot be sandboxed as the config requires."""
from __future__ import annotations

import subprocess

from .config import Config
from ..sandbox import hostcheck, launcher
from ..sandbox.profile import SandboxProfile, find_openblas


def preflight(config: Config) -> list[str]:
    """Refuse to run if workers cannot be sandboxed as configured; return warnings to log."""
    w = config.workers
    profile = SandboxProfile(engine="mlx", worker_user=w.user, python=w.python)
    launcher.bwrap_path()
    uid, gid = launcher.worker_identity(profile)
    try:
        probe = subprocess.run([w.python, "-c", "import sealbox.worker.main"], user=uid, group=gid,
                               extra_groups=[], capture_output=True, env={"PATH": "/usr/bin:/bin"}, cwd="/")
        failure = probe.stderr.decode(errors="replace").strip().splitlines()[-1:] if probe.returncode else None
    except OSError as exc:
        failure = [exc.strerror]
    if failure is not None:
        raise launcher.SandboxUnavailable(
            f"runtime: the worker user {w.user!r} cannot run {w.python} with sealbox installed "
            f"({(failure or ['no output'])[0]}); use a Python outside root's home, "
            "e.g. a venv made from /usr/bin/python3")
    report = hostcheck.host_report()
    details = {"namespaces": report["namespaces"].get("detail", ""),
               "worker_uid": f"worker user {w.user!r}",
               "seccomp": report["seccomp"]["detail"],
               "landlock": f"Landlock ABI {report['landlock']['abi']} (needs 6: TCP denial and scopes)",
               "cgroups": f"memory via {report['cgroups']['memory']}, pids via {report['cgroups']['pids']}"}
    required = ["namespaces", "worker_uid"] + [layer for layer in ("seccomp", "landlock", "cgroups")
                                               if getattr(w, layer)]
    for layer in required:
        if not report["layers"][layer]:
            raise launcher.SandboxUnavailable(
                f"sandbox layer {layer} is required but unavailable on this host ({details[layer]}); "
                f"no worker is started. To run without it, set [workers] {layer} = false in {config.path}")
    warnings = [] if find_openblas() or not w.openblas else [
        "[workers] openblas = true but Debian's OpenBLAS (libopenblas0-pthread) is not installed: "
        "workers use MLX's bundled reference BLAS, which is much slower"]
    return warnings + [f"sandbox layer {layer} is disabled by [workers] {layer} = false in {config.path}: "
                       "workers run without it" for layer in ("seccomp", "landlock", "cgroups") if not getattr(w, layer)]

