"""Render a SandboxProfile into a bubblewrap command line and start a worker.

bwrap is never run as root: the child drops to the dedicated worker uid
(setgroups, setresgid, setresuid via Popen's user/group/extra_groups) before
exec'ing bwrap, because bwrap started as root keeps host uid 0 inside.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import pwd
import shutil
import subprocess
from typing import Mapping

from ..proto.contract import (SOCKET_DIR_IN_SANDBOX, SOCKET_NAME, ModelHandoff, SandboxSpec, ToolRun,
                                     WorkerSpec)
from .profile import SandboxProfile


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class SandboxUnavailable(Exception):
    """A layer the profile requires cannot be applied on this host: no worker is started."""


def bwrap_path() -> str:
    path = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if not path:
        raise SandboxUnavailable("namespaces: bubblewrap (bwrap) not found; install Debian's 'bubblewrap'")
    return path


def worker_identity(profile: SandboxProfile) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(profile.worker_user)
    except KeyError:
        raise SandboxUnavailable(f"uid: worker user {profile.worker_user!r} does not exist "
                                 f"(create it: useradd --system --no-create-home {profile.worker_user})") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise SandboxUnavailable(f"uid: worker user {profile.worker_user!r} must not be uid/gid 0")
    return entry.pw_uid, entry.pw_gid


def bwrap_args(profile: SandboxProfile, socket_dir: str, seccomp_fd: int | None = None,
               extra_ro_files: Mapping[str, str] | None = None) -> list[str]:
    """bubblewrap's arguments for this profile, up to (not including) the command."""
    args = [
        # Every namespace but the network one, which the launcher makes as root before the uid drop:
        # bwrap would bring `lo` up in its own; ours keeps it down, and the worker's user namespace
        # holds no capability over it.
        "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup",
        "--disable-userns",  # no nested user namespaces
        "--die-with-parent", "--new-session", "--clearenv",
        "--hostname", "sandbox",
        "--cap-drop", "ALL",
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(profile.tmpfs_size), "--tmpfs", "/tmp",
        # Debian's merged /usr: the top-level dirs are symlinks into /usr.
        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
    ]
    for path in (*profile.runtime_paths, *profile.extra_ro_paths):
        args += ["--ro-bind", path, path]
    for host, dest in (extra_ro_files or {}).items():  # an operator's script for run-python
        args += ["--ro-bind", host, dest]
    args += ["--bind", socket_dir, SOCKET_DIR_IN_SANDBOX, "--chdir", "/tmp"]
    for key, value in profile.worker_environment().items():
        args += ["--setenv", key, value]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    return args


def seatbelt_command(profile: SandboxProfile, socket_dir: str, tmp_dir: str, model_paths: list[str],
                     spec: WorkerSpec) -> list[str]:
    """macOS: the worker under sandbox-exec with a Seatbelt profile generated from the same profile value.

    Never run on these Linux machines (see SECURITY.md); tests check the command and profile text.
    """
    from .macos import seatbelt_profile
    socket = os.path.join(socket_dir, SOCKET_NAME)
    text = seatbelt_profile(read_only=[*profile.runtime_paths, *profile.extra_ro_paths, *model_paths],
                            read_write=[socket_dir, tmp_dir], socket_path=socket, exec_once=profile.python)
    return ["/usr/bin/sandbox-exec", "-p", text, profile.python, "-m", "sealbox.worker.main", spec.to_json()]


def worker_spec(profile: SandboxProfile, files: Mapping[str, int], run: ToolRun | None = None,
                seccomp_stage2_fd: int | None = None, extra_read_only: tuple[str, ...] = (),
                pool: bool = False) -> WorkerSpec:
    """The worker's single argument: how to confine itself, and what to load."""
    sandbox = SandboxSpec(
        engine=profile.engine,
        landlock=profile.landlock,
        # Landlock: the runtime and random sources read-only; the size-limited tmpfs writable; in the
        # socket directory (a host directory) only the socket itself may be made.
        read_only=(*profile.runtime_paths, *profile.extra_ro_paths, *extra_read_only, "/dev/urandom", "/dev/zero"),
        read_write=("/tmp", "/dev/null"),
        socket_dirs=(SOCKET_DIR_IN_SANDBOX,),
        seccomp_stage2_fd=seccomp_stage2_fd,
        preload=profile.preload,
        symlink_dirs=profile.symlink_dirs)
    return WorkerSpec(sandbox, ModelHandoff(files=dict(files), max_message_bytes=profile.max_message_bytes,
                                            engine_options=dict(profile.engine_options),
                                            batching=profile.batching,
                                            freed_buffer_bytes=profile.freed_buffer_bytes), run, pool)


def make_socket_dir(parent: str, name: str, profile: SandboxProfile) -> str:
    """A fresh directory owned by the worker uid, mode 0700: the worker's only writable bind."""
    uid, gid = worker_identity(profile)
    os.makedirs(parent, mode=0o711, exist_ok=True)
    path = os.path.join(parent, name)
    if os.path.lexists(path):
        shutil.rmtree(path)
    os.mkdir(path, 0o700)
    os.chown(path, uid, gid)
    return path


@dataclasses.dataclass
class SandboxedWorker:
    """A launched worker: the bwrap process (the sandbox's parent) and the worker's cgroup."""
    proc: subprocess.Popen
    cgroup: object = None     # sealbox.sandbox.cgroups.WorkerCgroup when the profile asks for cgroups

    def kill(self) -> None:
        """Kill the whole worker tree (one cgroup.kill write where the host has it) and reap bwrap."""
        if self.cgroup is not None:
            self.cgroup.kill()
        if self.proc.poll() is None:
            self.proc.kill()  # --die-with-parent takes the sandbox down with bwrap
        self.proc.wait()

    def oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_killed()

    def pids_limit_hit(self) -> bool:
        return self.cgroup is not None and bool(self.cgroup.pids_limit_hit())

    def cleanup(self) -> None:
        """After the worker is dead: remove its cgroup."""
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None

    def stop(self) -> None:
        """Kill the worker tree and remove its cgroup."""
        self.kill()
        self.cleanup()


def launch(profile: SandboxProfile, socket_dir: str, files: Mapping[str, int],
           run: ToolRun | None = None, extra_ro_files: Mapping[str, str] | None = None,
           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pool: bool = False) -> SandboxedWorker:
    """Start one sandboxed worker with every layer the profile asks for; fail closed if one is unavailable.

    `run` replaces the model loader with a script or a module's main (operator tools); everything else about the sandbox stays the same.
    `pool` starts a warm-pool worker (no files): it waits for its model in a LOAD record (proto/hop.py).
    """
    uid, gid = worker_identity(profile)
    owned_fds: list[int] = []
    cgroup = None
    try:
        stage1 = stage2 = None
        if profile.seccomp:
            from . import seccomp
            try:
                stage1 = seccomp.bpf_memfd(seccomp.stage1_bpf(profile.engine))
                owned_fds.append(stage1)
                stage2 = seccomp.bpf_memfd(seccomp.stage2_bpf(profile.engine))
                owned_fds.append(stage2)
            except seccomp.SeccompError as exc:
                raise SandboxUnavailable(str(exc)) from None
        if profile.cgroups:
            from . import cgroups
            try:
                # Unique per launching process: two daemons on one host may serve same-named models.
                name = f"{os.getpid()}-{os.path.basename(socket_dir)}"
                cgroup = cgroups.WorkerCgroup.create(name, profile.memory_bytes, profile.pids_max)
            except cgroups.CgroupError as exc:
                raise SandboxUnavailable(str(exc)) from None
        command = [bwrap_path(), *bwrap_args(profile, socket_dir, stage1, extra_ro_files), "--",
                   profile.python, "-m", "sealbox.worker.main",
                   worker_spec(profile, files, run, stage2, tuple((extra_ro_files or {}).values()), pool).to_json()]

        proc = subprocess.Popen(
            command, pass_fds=(*files.values(), *owned_fds),
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            env={"PATH": "/usr/bin:/bin"},  # bwrap's own environment is visible in /proc/1/environ
            cwd="/", preexec_fn=_preexec(profile, cgroup, uid, gid), close_fds=True)
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        raise
    finally:
        for fd in owned_fds:
            os.close(fd)
    return SandboxedWorker(proc, cgroup)


def _preexec(profile: SandboxProfile, cgroup, uid: int, gid: int):
    from .limits import apply_rlimits

    def preexec():
        # As root: join the worker's cgroup (before any fork inside), enter a fresh network
        # namespace (only a downed lo; not for the fetch helper), then drop to the worker uid.
        if cgroup is not None:
            cgroup.attach_self()
        if not profile.network and _libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        apply_rlimits(nofile=profile.nofile, fsize=profile.fsize_bytes, core=0)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    return preexec


def launch_helper(profile: SandboxProfile, socket_dir: str, module: str, argument: str) -> SandboxedWorker:
    """Start a helper (`python -m MODULE ARGUMENT`) in the profile's sandbox, talking over stdin/stdout
    pipes; the same layers as a worker (bubblewrap, uid, seccomp stage 1, cgroup, rlimits), and the
    host's network when the profile says so. The helper applies its own Landlock rules."""
    uid, gid = worker_identity(profile)
    owned_fds: list[int] = []
    cgroup = None
    try:
        stage1 = None
        if profile.seccomp:
            from . import seccomp
            try:
                stage1 = seccomp.bpf_memfd(seccomp.stage1_bpf(profile.engine))
                owned_fds.append(stage1)
            except seccomp.SeccompError as exc:
                raise SandboxUnavailable(str(exc)) from None
        if profile.cgroups:
            from . import cgroups
            try:
                cgroup = cgroups.WorkerCgroup.create(f"{os.getpid()}-{os.path.basename(socket_dir)}",
                                                     profile.memory_bytes, profile.pids_max)
            except cgroups.CgroupError as exc:
                raise SandboxUnavailable(str(exc)) from None
        command = [bwrap_path(), *bwrap_args(profile, socket_dir, stage1), "--", profile.python, "-m", module, argument]
        proc = subprocess.Popen(command, pass_fds=tuple(owned_fds), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"}, cwd="/",
                                preexec_fn=_preexec(profile, cgroup, uid, gid), close_fds=True, bufsize=0)
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        raise
    finally:
        for fd in owned_fds:
            os.close(fd)
    return SandboxedWorker(proc, cgroup)


def run_tool(profile: SandboxProfile, run: ToolRun, files: Mapping[str, int] | None = None,
             extra_files: Mapping[str, bytes] | None = None, run_dir: str = "/run/sealbox/tools") -> int:
    """Run an operator tool in a worker's sandbox with stdout/stderr passed through; its exit status back.

    extra_files maps a path inside the sandbox to its content: a private read-only copy is bound
    there (the worker user need not be able to reach the operator's original).
    """
    import tempfile

    os.makedirs(run_dir, mode=0o711, exist_ok=True)
    parent = tempfile.mkdtemp(prefix="tool-", dir=run_dir)
    os.chmod(parent, 0o711)
    try:
        binds = {}
        for index, (dest, content) in enumerate((extra_files or {}).items()):
            copy = os.path.join(parent, f"file{index}")
            with open(copy, "wb") as f:
                f.write(content)
            os.chmod(copy, 0o444)
            binds[copy] = dest
        socket_dir = make_socket_dir(parent, "sock", profile)
        worker = launch(profile, socket_dir, files or {}, run=run, extra_ro_files=binds,
                        stdout=None, stderr=None)
        try:
            return worker.proc.wait()
        finally:
            worker.stop()
    finally:
        shutil.rmtree(parent, ignore_errors=True)
