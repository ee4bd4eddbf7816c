"""Start-up checks: refuse to run when workers cannot be sandboxed as the config requires;
--check-config's checks of everything a config names (without starting a worker); the clean-up of
what a daemon that died left behind."""
from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import stat
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



def check_config(config: Config, log_file: str | None = None) -> list[str]:
    """Everything --check-config can check without starting a worker; one line per problem,
    naming the key, the path and the check. Creates state_dir (root, 0700) when it is absent."""
    from ..trust import VerificationError
    from ..trust.verifying import check_source
    problems = []
    where = config.path
    for name, model in config.models.items():
        key = f"{where}: [models.{name}] path {model.path}"
        if not os.path.exists(model.path):
            problems.append(f"{key}: exists: no such file or directory")
            continue
        try:
            check_source(model.path, model.policy)
        except VerificationError as exc:
            problems.append(f"{key}: inside sources: {exc.detail}")
        manifest = model.policy.pinned_manifest
        if manifest and not os.access(manifest, os.R_OK):
            problems.append(f"{where}: [models.{name}] pinned_manifest {manifest}: readable: cannot read it")
    state = config.server.state_dir
    try:
        os.makedirs(state, mode=0o700, exist_ok=True)
        st = os.lstat(state)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o700:
            problems.append(f"{where}: [server] state_dir {state}: owned by root with mode 0700: it is "
                            f"{'a directory' if stat.S_ISDIR(st.st_mode) else 'not a directory'} owned by uid "
                            f"{st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}")
    except OSError as exc:
        problems.append(f"{where}: [server] state_dir {state}: creatable: {exc.strerror}")
    dirs = [("[server] run_dir", config.server.run_dir)]
    if config.server.audit_log:
        dirs.append(("[server] audit_log", os.path.dirname(os.path.abspath(config.server.audit_log))))
    if log_file:
        dirs.append(("--log-file", os.path.dirname(os.path.abspath(log_file))))
    for key, path in dirs:
        why = _not_creatable(path)
        if why:
            problems.append(f"{where}: {key} {path}: creatable: {why}")
    w = config.workers
    try:
        user = pwd.getpwnam(w.user)
    except KeyError:
        problems.append(f"{where}: [workers] user {w.user!r}: exists: no such user")
        return problems
    if user.pw_uid == 0:
        problems.append(f"{where}: [workers] user {w.user!r}: not root: it has uid 0")
        return problems
    why = _not_executable_by(w.python, user)
    if why:
        problems.append(f"{where}: [workers] python {w.python}: executable by {w.user!r}: {why}")
    return problems


def _not_creatable(path: str) -> str | None:
    """Why `path` cannot be a directory made by the daemon, or None."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return None if os.path.isdir(path) else "exists and is not a directory"
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def _not_executable_by(path: str, user: pwd.struct_passwd) -> str | None:
    """Why `user` cannot execute `path` (every directory on the way searchable, the file executable),
    from the permission bits, or None."""
    import grp
    gids = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem}

    def allowed(st: os.stat_result, bit: int) -> bool:
        if st.st_uid == user.pw_uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid in gids:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)
    if not os.path.isabs(path):
        return "not an absolute path"
    for candidate in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        parts = candidate.split("/")
        for i in range(1, len(parts)):
            directory = "/".join(parts[:i]) or "/"
            try:
                st = os.stat(directory)
            except OSError as exc:
                return f"{directory}: {exc.strerror}"
            if not allowed(st, 1):
                return f"cannot search {directory} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid})"
    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror
    if not stat.S_ISREG(st.st_mode) or not allowed(st, 1):
        return f"no execute permission on {os.path.realpath(path)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


_LEFT_BEHIND = re.compile(r"^(\d+)-")   # worker directories and cgroups start with the daemon's pid


def _left_by_a_dead_daemon(name: str) -> bool:
    match = _LEFT_BEHIND.match(name)
    if not match:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_leftovers(config: Config) -> list[str]:
    """Remove the worker directories and cgroups a daemon that died left behind: only sealbox's own,
    named <daemon pid>-... with that pid gone. Returns what was removed; logs what could not be."""
    removed = []
    run_dir = config.server.run_dir
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        names = []
    for name in names:
        path = os.path.join(run_dir, name)
        if _left_by_a_dead_daemon(name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if config.workers.cgroups:
        from ..sandbox.cgroups import CgroupError, remove_stale_groups
        try:
            removed += remove_stale_groups(_left_by_a_dead_daemon)
        except (CgroupError, OSError) as exc:
            logging.getLogger("sealboxd").error("%s", exc)
    return removed
