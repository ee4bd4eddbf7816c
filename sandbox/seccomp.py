"""Seccomp allowlists for workers, in two stages (Linux x86_64).

Stage 1 (`stage1_bpf`) is default-deny: every syscall not listed below kills
the whole process with SIGSYS. bubblewrap installs it (`bwrap --seccomp FD`)
just before it execs the worker, so it must also allow that execve and what
bwrap's own pid 1 does afterwards (wait4, write, exit_group).

Stage 2 (`stage2_bpf`) kills the syscalls only needed at start: execve and
execveat, and the confinement calls themselves (Landlock, seccomp). The
worker loads it on itself with `load_stage2` once confined; it needs no
libseccomp, because building a filter is done by the supervisor (pyseccomp
finds libseccomp with ctypes.util.find_library, which forks ldconfig: stage 1
would kill that). Pass the stage-2 bytes to the worker in an inherited fd
(`bpf_memfd`) and load them with `load_stage2_from_fd`.

Filters are for the native x86_64 ABI only: libseccomp makes them kill any
syscall made through a foreign architecture (int 0x80 i386 entry) or the x32
ABI, as the bad-architecture action below.

How the allowlist was measured: SECURITY.md ("How the seccomp allowlists were measured").
The worker must run with limits.WORKER_ENVIRONMENT (HOME and
PYTHONDONTWRITEBYTECODE keep Python's start-up inside this list).
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform

from ..proto.contract import MEMFD_SEALS

# Allowed without conditions: (syscalls, why the worker needs them).
_ALLOW = (
    (("read", "write", "pread64", "lseek", "close", "openat", "newfstatat", "fstat", "stat",
      "readlink", "access", "getdents64", "getcwd"),
     "files: Python imports (getcwd for -m and ''), the sealed model memfds (/proc/self/fd/N), stdio"),
    (("mmap", "munmap", "mprotect", "mremap", "brk"),
     "memory: malloc/realloc (mremap when a big read buffer shrinks), the dynamic loader (madvise: below)"),
    (("mbind", "sched_yield"),
     "OpenBLAS (numpy's, and Debian's when the profile preloads it): NUMA policy, yielding threads"),
    (("futex", "set_robust_list", "rseq", "set_tid_address", "gettid", "exit", "exit_group",
      "sched_getaffinity", "sched_getparam", "sched_getscheduler", "clock_nanosleep"),
     "threads: glibc pthreads, MLX's and OpenBLAS's thread pools, the hop's reader threads, time.sleep"),
    (("rt_sigaction", "rt_sigprocmask", "rt_sigreturn"), "signals: Python's SIGTERM handler"),
    (("restart_syscall",),
     "SIGSTOP then SIGCONT (a debugger, job control, a cgroup freezer) resumes an interrupted sleep with it"),
    (("arch_prctl", "getrandom", "sysinfo", "uname", "getpid"),
     "runtime start: TLS setup, hash seed, memory size, platform, getpid (abort(), logging)"),
    (("bind", "listen", "accept4", "shutdown", "recvmsg", "sendmsg", "getsockname"),
     "the hop on its Unix socket (proto/hop.py; socket() itself is limited to AF_UNIX below)"),
    (("epoll_create1",), "`import socket` imports selectors, which probes epoll once"),
    (("unlink",), "not used by the model worker since gRPC left it; kept for the operator tools run in the "
                  "same sandbox (`sealbox sandbox run-python` scripts remove their scratch files in /tmp)"),
    (("memfd_create",),
     "the hop: a large response leaves in a sealed memfd; GGUF weights: MLX maps its file shared and "
     "writable, so the worker hands it a private copy"),
    (("wait4",), "bubblewrap's pid 1 reaps the worker and exits with its status"),
    (("execve",), "bubblewrap execs the worker under this filter (stage 2 then forbids it)"),
    (("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"),
     "the worker confines itself with Landlock (stage 2 then forbids it)"),
)

# What one engine needs beyond _ALLOW: {engine: ((syscalls, why), ...)}.
_ENGINE_EXTRA = {
    "mlx": (),
    "flux": (),   # numpy only: nothing beyond the common list
    # The fetch helper (sealbox.transfer.helper), not a model worker: TCP/TLS clients and name lookups.
    "fetch": ((("connect", "sendto", "recvfrom", "sendmmsg", "poll", "ppoll"),
               "HTTPS: connect, send and receive on inet sockets, wait with timeouts (urllib3), DNS over UDP"),
              (("getsockopt", "setsockopt", "getpeername"),
               "TCP clients: SO_ERROR after a non-blocking connect, TCP_NODELAY and keep-alive (urllib3, "
               "paramiko), the peer's address (ssl); the model workers' hop needs none of them")),
    # Measured with strace -f on LlmEngine (load, chat template, sampled and streamed generation), then in
    # the real sandbox through the daemon; an llm-specific set, the common list untouched.
    "mlx-lm": ((("mkdir", "symlink"),
                "the private model directory in the worker's own tmpfs: symlinks to the sealed memfds"),
               (("statx",), "the tokenizers library (Rust std) stats files and its cgroup's cpu limits with it")),
}

# Socket families each filter allows (everything else fails with EAFNOSUPPORT): a worker talks only
# over its Unix socket; the fetch helper also opens IPv4/IPv6 sockets (its network namespace is the host's).
_AF_INET, _AF_INET6 = 2, 10
_SOCKET_FAMILIES = {"fetch": (1, _AF_INET, _AF_INET6)}

# Syscalls that stage 2 kills: exec and the confinement calls, only needed at start.
_START_ONLY = ("execve", "execveat", "landlock_create_ruleset", "landlock_add_rule",
               "landlock_restrict_self", "seccomp")

# Engines with a measured allowlist; anything else has no filter and is refused.
ENGINES = tuple(_ENGINE_EXTRA)

# Constants from <linux/sched.h>, <linux/prctl.h>, <linux/seccomp.h>, <asm-generic/ioctls.h>.
_AF_UNIX = 1
_CLONE_THREAD = 0x00010000
_PR_SET_NO_NEW_PRIVS, _PR_SET_VMA = 38, 0x53564D41
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC = 1, 1
_TCGETS, _FIOCLEX, _TIOCGWINSZ, _FIONBIO = 0x5401, 0x5451, 0x5413, 0x5421
_F_GETFD, _F_SETFD, _F_GETFL, _F_SETFL = 1, 2, 3, 4
_F_ADD_SEALS, _F_GET_SEALS, _F_DUPFD_CLOEXEC = 1033, 1034, 1030
_SIGABRT = 6
# madvise advices (<asm-generic/mman-common.h>) a worker may give: all but MADV_REMOVE (9) and the
# hardware-poisoning ones (100, 101: root only anyway). malloc uses DONTNEED/FREE, numpy HUGEPAGE.
_MADV_ALLOWED = (0, 1, 2, 3, 4, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25)
_NR_SECCOMP_X86_64 = 317
_BPF_INSN_SIZE = 8          # sizeof(struct sock_filter)
_BPF_MAXINSNS = 4096


class SeccompError(Exception):
    """seccomp: a filter cannot be built or loaded (the message says why)."""


def _check_host() -> None:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise SeccompError(f"seccomp: allowlists exist for Linux x86_64 only, not {platform.system()} "
                           f"{platform.machine()}")


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise SeccompError(f"seccomp: no syscall allowlist for engine {engine!r} "
                           f"(measured: {', '.join(ENGINES)})")


def _new_filter(default_action: int):
    """A libseccomp filter for the native arch; other arches and x32 kill the process."""
    import pyseccomp  # imported here: the worker, which only loads filters, must not need libseccomp

    f = pyseccomp.SyscallFilter(default_action)
    f.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    return f


def _export(f) -> bytes:
    fd = os.memfd_create("sealbox-seccomp", os.MFD_CLOEXEC)
    try:
        with open(fd, "w+b", closefd=False) as file:
            f.export_bpf(file)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def stage1_bpf(engine: str) -> bytes:
    """The worker's allowlist as BPF for `bwrap --seccomp FD`: everything else kills the process."""
    import pyseccomp as sc

    _check_host()
    _check_engine(engine)
    f = _new_filter(sc.KILL_PROCESS)
    for names, _why in (*_ALLOW, *_ENGINE_EXTRA[engine]):
        for name in names:
            f.add_rule(sc.ALLOW, name)
    # Sockets: Unix only (the fetch helper: and inet); other families fail softly (a library
    # probing AF_INET6 does not kill the worker).
    families = _SOCKET_FAMILIES.get(engine, (_AF_UNIX,))
    for family in families:
        f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, family))
    if families == (_AF_UNIX,):
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, _AF_UNIX))
    else:
        for family in (f_ for f_ in range(0, max(families)) if f_ not in families):
            f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.EQ, family))
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.GT, max(families)))
    # Threads yes, processes no. clone3 hides its flags in memory where BPF cannot look:
    # ENOSYS makes glibc fall back to clone, whose flags we check.
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # ioctl: isatty() on stdio, close-on-exec, and the window size argparse asks for (measured:
    # `sealbox scan` in the sandbox); all three only read or set fd flags, none reaches a device.
    for request in (_TCGETS, _FIOCLEX, _TIOCGWINSZ, *((_FIONBIO,) if engine == "fetch" else ())):
        f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, request))  # FIONBIO: Python's socket timeouts
    # fcntl: descriptor and status flags only (F_SETOWN/F_SETSIG would turn SIGIO into a signal channel).
    # F_ADD_SEALS / F_GET_SEALS: the hop seals its memfds and checks the supervisor's; F_DUPFD_CLOEXEC:
    # Python's mmap keeps a duplicate of the descriptor it maps.
    for command in (_F_GETFD, _F_SETFD, _F_GETFL, _F_SETFL, _F_ADD_SEALS, _F_GET_SEALS, _F_DUPFD_CLOEXEC):
        f.add_rule(sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, command))
    # prctl: naming anonymous memory (glibc), no_new_privs before stage 2.
    for option in (_PR_SET_VMA, _PR_SET_NO_NEW_PRIVS):
        f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, option))
    # madvise: the listed advices only, compared on all 64 bits (the kernel reads the advice as an int,
    # so a "not MADV_REMOVE" rule would pass 0x1_00000009). MADV_REMOVE, which punches a hole in a shared
    # file mapping, is not among them: a worker could otherwise empty pages of an output arena it said it
    # wrote while the supervisor copies them (daemon/shared_memory.py), for the root process to allocate.
    for advice in _MADV_ALLOWED:
        f.add_rule(sc.ALLOW, "madvise", sc.Arg(2, sc.EQ, advice))
    # Only our own rlimits (glibc's getrlimit is prlimit64(0, ...)).
    f.add_rule(sc.ALLOW, "prlimit64", sc.Arg(0, sc.EQ, 0))
    # abort() signals itself with SIGABRT: an MLX crash shows as SIGABRT, not a seccomp kill.
    f.add_rule(sc.ALLOW, "tgkill", sc.Arg(2, sc.EQ, _SIGABRT))
    # The worker adds its stage-2 filter (more filters can only restrict further).
    f.add_rule(sc.ALLOW, "seccomp", sc.Arg(0, sc.EQ, _SECCOMP_SET_MODE_FILTER),
               sc.Arg(1, sc.EQ, _SECCOMP_FILTER_FLAG_TSYNC))
    return _export(f)


def stage2_bpf(engine: str) -> bytes:
    """The worker's second filter: kills exec and the start-only calls; stage 1 still applies."""
    import pyseccomp as sc

    _check_host()
    _check_engine(engine)
    f = _new_filter(sc.ALLOW)
    for name in _START_ONLY:
        f.add_rule(sc.KILL_PROCESS, name)
    return _export(f)


def bpf_memfd(bpf: bytes) -> int:
    """A sealed memfd holding bpf at offset 0, inheritable: for `bwrap --seccomp FD` or the worker."""
    import fcntl

    fd = os.memfd_create("sealbox-seccomp", os.MFD_ALLOW_SEALING)
    os.write(fd, bpf)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_stage2(bpf: bytes) -> None:
    """Install bpf on every thread of this process (no_new_privs first). No libseccomp needed."""
    if platform.machine() != "x86_64":
        raise SeccompError(f"seccomp: loading filters is implemented for x86_64, not {platform.machine()}")
    if not bpf or len(bpf) % _BPF_INSN_SIZE or len(bpf) // _BPF_INSN_SIZE > _BPF_MAXINSNS:
        raise SeccompError(f"seccomp: {len(bpf)} bytes is not a BPF program")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(f"seccomp: prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(err)}")
    program = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // _BPF_INSN_SIZE, ctypes.addressof(program))
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(_NR_SECCOMP_X86_64), ctypes.c_long(_SECCOMP_SET_MODE_FILTER),
                          ctypes.c_long(_SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog))
    if result > 0:  # TSYNC: this thread id already runs a different filter
        raise SeccompError(f"seccomp: thread {result} cannot be synchronised to the filter")
    if result != 0:
        err = ctypes.get_errno()
        raise SeccompError(f"seccomp: seccomp(SECCOMP_SET_MODE_FILTER) failed: {os.strerror(err)}")


def load_stage2_from_fd(fd: int) -> None:
    """Read a filter from an inherited fd (see bpf_memfd), close it, and load it."""
    chunks = []
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    load_stage2(b"".join(chunks))


def libseccomp_version() -> str:
    """The libseccomp library version pyseccomp uses, e.g. "2.5.4"."""
    import pyseccomp

    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    lib = pyseccomp._libseccomp  # the CDLL pyseccomp loaded: the library that builds our filters
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    v = lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def seccomp_available() -> tuple[bool, str]:
    """Can this host build and enforce our filters? (ok, what was found or what is missing)."""
    try:
        _check_host()
        with open("/proc/self/status") as f:
            if not any(line.startswith("Seccomp:") for line in f):
                return False, "seccomp: the kernel has no seccomp support (no Seccomp: in /proc/self/status)"
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            actions = f.read().split()
        if "kill_process" not in actions:
            return False, f"seccomp: the kernel lacks the kill_process action (has: {' '.join(actions)})"
        version = libseccomp_version()
    except SeccompError as exc:
        return False, str(exc)
    except OSError as exc:
        return False, f"seccomp: cannot read the kernel's seccomp state: {exc}"
    except (ImportError, RuntimeError) as exc:  # pyseccomp raises RuntimeError without libseccomp
        return False, f"seccomp: libseccomp unusable ({exc}); install libseccomp2 and pyseccomp"
    return True, f"libseccomp {version}; kernel actions: {' '.join(actions)}"
