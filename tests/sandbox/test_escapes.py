"""Escape attempts from inside a real worker sandbox, through `sealbox sandbox run-python`.

Each attempt (tests/escape_probe.py) runs in exactly the sandbox a worker gets
and must be stopped by the layer meant to stop it, seen in the exact outcome:
a seccomp kill is exit 159 (SIGSYS) with the attempt's "start" line last, a
seccomp errno rule gives its errno, Landlock gives EACCES (EPERM for its signal
scope), a read-only bind EROFS, the mount/pid/network namespaces ENOENT/ESRCH/
ECONNREFUSED, the cgroup an OOM kill (137) or a refused thread, the tmpfs size
ENOSPC and RLIMIT_FSIZE EFBIG.

Each attempt also has a control showing it is meaningful: the same probe code,
run unconfined in a plain subprocess (as the worker uid, or as root for
harmless variants: invalid arguments, a `sleep` the test started, a FIFO in a
test directory), or in the same sandbox with only the layer under test turned
off (SandboxProfile(landlock=False) / a larger pids_max, through the same
launcher.run_tool that run-python uses). If a control did not get through,
the sandbox outcome would prove nothing, so the control is asserted too.

Safe even if a layer were missing: dangerous calls get invalid arguments,
loops are bounded, network attempts only reach sockets this module listens on.
All sandbox runs start together (a pool of 4) in one module fixture: the
killing attempts need a run each, the others share one run.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

PYTHON = sys.executable
SEALBOX = str(pathlib.Path(PYTHON).with_name("sealbox"))
TESTS = pathlib.Path(__file__).resolve().parent
PROBE = TESTS / "escape_probe.py"
ESCAPES_MD = TESTS.parents[1] / "SECURITY.md"   # its table of escape attempts
RUN_ROOT = "/run/sealbox-test-escapes"   # reachable by the worker uid (pytest's tmp_path is not)
WORKER_USER = "sealbox-worker"
PIDS_MAX = 64                             # SandboxProfile's default, what run-python uses
SIGSYS_EXIT = 128 + signal.SIGSYS         # 159: a seccomp kill
SIGKILL_EXIT = 128 + signal.SIGKILL       # 137: the cgroup's OOM kill
KILLED = "killed by SIGSYS"               # the expected "outcome" of a seccomp-killed attempt

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                       reason="the worker sandbox and the probe's syscall numbers are Linux x86_64"),
    pytest.mark.skipif(os.geteuid() != 0, reason="sealbox sandbox run-python must run as root"),
]


@dataclasses.dataclass(frozen=True)
class Attempt:
    name: str
    what: str
    layer: str
    inside: str | re.Pattern          # expected outcome in the sandbox (KILLED: a seccomp kill)
    control: str | None               # where the control runs: worker | root | root-alone | landlock-off
    control_outcome: str | re.Pattern | None


def _a(name, what, layer, inside, control=None, control_outcome=None):
    return Attempt(name, what, layer, inside, control, control_outcome)


ATTEMPTS = [
    # ---------------------------------------------------------------- network
    _a("tcp4_connect", "TCP connect to 127.0.0.1, a port the test listens on",
       "seccomp (socket() of any family but AF_UNIX -> EAFNOSUPPORT)", "OSError:EAFNOSUPPORT",
       "worker", re.compile(r"ok:connected to 127\.0\.0\.1:\d+")),
    _a("udp4_send", "UDP datagram to 127.0.0.1, a port the test receives on",
       "seccomp (EAFNOSUPPORT)", "OSError:EAFNOSUPPORT", "worker", "ok:sent"),
    _a("tcp6_connect", "TCP connect to ::1, a port the test listens on",
       "seccomp (EAFNOSUPPORT)", "OSError:EAFNOSUPPORT",
       "worker", re.compile(r"ok:connected to \[::1\]:\d+")),
    _a("raw_socket", "socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)",
       "seccomp (EAFNOSUPPORT)", "OSError:EAFNOSUPPORT", "root", "ok:raw socket"),
    _a("packet_socket", "socket(AF_PACKET, SOCK_RAW)",
       "seccomp (EAFNOSUPPORT)", "OSError:EAFNOSUPPORT", "root", "ok:packet socket"),
    _a("netlink_socket", "socket(AF_NETLINK, NETLINK_ROUTE) and bind",
       "seccomp (EAFNOSUPPORT)", "OSError:EAFNOSUPPORT", "worker", "ok:netlink socket bound"),
    _a("abstract_unix_dgram", "sendmsg to an abstract Unix datagram socket the test listens on in the host",
       "network namespace (abstract names are per netns; Landlock's abstract-unix scope is behind it)",
       "ConnectionRefusedError:ECONNREFUSED", "worker", "ok:sent"),
    _a("abstract_unix_connect", "connect to an abstract Unix stream socket the test listens on in the host",
       "seccomp (connect is not on the allowlist: SIGSYS)", KILLED, "worker", "ok:connected"),
    _a("daemon_socket_connect", "connect to a daemon-style public Unix socket (mode 0666) the test made in a host dir",
       "seccomp (connect: SIGSYS); the mount namespace hides the path too", KILLED, "worker", "ok:connected"),
    _a("daemon_dir_dgram", "sendmsg to a Unix datagram socket (mode 0666) in that host dir",
       "mount namespace (the host dir is not in the view)", "FileNotFoundError:ENOENT", "worker", "ok:sent"),
    # ---------------------------------------------------------------- files
    _a("read_secret", "read a secret the test made as root, mode 0600, in a host dir",
       "mount namespace (not in the view)", "FileNotFoundError:ENOENT", "root", "ok:read b'sealbox-escape-secret'"),
    _a("read_world_readable", "read a mode 0644 file next to it (no DAC obstacle for the worker uid)",
       "mount namespace (not in the view)", "FileNotFoundError:ENOENT", "worker", "ok:read b'world-readable'"),
    _a("read_shadow", "read /etc/shadow", "mount namespace (/etc is not bound)",
       "FileNotFoundError:ENOENT", "root", re.compile(r"ok:read b'root:.*")),
    _a("listdir_root", "list / of the sandbox", "Landlock (no rule for /)", "PermissionError:EACCES",
       "landlock-off", re.compile(r"ok:.*\bproc\b.*")),
    _a("proc1_root", "list /proc/1/root (bwrap's pid 1)", "Landlock (no rule for /proc)",
       "PermissionError:EACCES", "landlock-off", re.compile(r"ok:.*\bproc\b.*")),
    _a("proc1_mem_write", "open /proc/1/mem read-write (code injection into bwrap's pid 1, which lacks the exec ban)",
       "Landlock (no rule for /proc)", "PermissionError:EACCES", "landlock-off", "ok:opened read-write"),
    _a("proc1_environ", "read /proc/1/environ (bwrap's environment)", "Landlock (no rule for /proc)",
       "PermissionError:EACCES", "landlock-off", "ok:PATH"),
    _a("write_sandbox_dir", "create a file in /run, a directory bwrap made in the sandbox root",
       "Landlock (not a read-write path)", "PermissionError:EACCES", "landlock-off",
       "ok:created /run/.sealbox-escape-probe"),
    _a("write_usr", "create a file in /usr/lib", "read-only bind (EROFS)", "OSError:EROFS",
       "root", "ok:created /usr/lib/.sealbox-escape-probe"),
    _a("write_venv", "create a file in the venv (sys.prefix)", "read-only bind (EROFS)", "OSError:EROFS",
       "root", re.compile(r"ok:created /.*/\.sealbox-escape-probe")),
    _a("write_code", "create a file in sealbox's code directory", "read-only bind (EROFS)", "OSError:EROFS",
       "root", re.compile(r"ok:created /.*/\.sealbox-escape-probe")),
    _a("write_proc_sys", "open /proc/sys/kernel/hostname for writing",
       "worker uid (not root in any namespace: DAC EACCES); Landlock denies /proc as well",
       "PermissionError:EACCES", "root", "ok:opened /proc/sys/kernel/hostname for writing"),
    _a("dev_mem", "open /dev/mem", "private /dev (bwrap --dev: null, zero, full, random, urandom, tty)",
       "FileNotFoundError:ENOENT", "root", "ok:opened /dev/mem"),
    _a("dev_block", "stat and open the host's disk (block device) read-only", "private /dev",
       "FileNotFoundError:ENOENT", "root", re.compile(r"ok:block device \d+:\d+ visible, (opened|open: EPERM)")),
    _a("dev_kmsg", "read /dev/kmsg (the kernel log)", "private /dev",
       "FileNotFoundError:ENOENT", "root", "ok:read the kernel log"),
    _a("mknod_mem", "mknodat a char device 1:1 (/dev/mem) in /tmp", "seccomp (mknodat: SIGSYS)", KILLED,
       "root", "ok:node made"),   # control: the same call making a FIFO in a test dir
    _a("open_by_handle_at", "open_by_handle_at with a forged (empty) handle", "seccomp (SIGSYS)", KILLED,
       "root", "OSError:EINVAL"),
    # ---------------------------------------------------------------- processes
    _a("execve_sh", "execve /bin/sh", "seccomp stage 2 (exec ban loaded by the worker: SIGSYS)", KILLED,
       "root-alone", "ok:/bin/sh ran"),
    _a("fork_bomb", "fork (bounded to 32 forks)", "seccomp (clone without CLONE_THREAD: SIGSYS)", KILLED,
       "root", "ok:forked 32"),
    _a("ptrace_attach", "ptrace(PTRACE_ATTACH) pid 1 (bwrap)", "seccomp (SIGSYS)", KILLED,
       "root", re.compile(r"ok:attached to \d+")),   # control: a `sleep` the test started
    _a("ptrace_traceme", "ptrace(PTRACE_TRACEME)", "seccomp (SIGSYS)", KILLED, "root-alone", "ok:traced"),
    _a("process_vm_readv", "process_vm_readv from pid 1", "seccomp (SIGSYS)", KILLED,
       "root", "OSError:EFAULT"),   # control: an unmapped address of a `sleep` the test started
    _a("kill_pid1", "kill(1, 0)", "seccomp (kill is not on the allowlist: SIGSYS)", KILLED,
       "root", "ok:may signal"),
    _a("pidfd_getfd", "pidfd_open(1) + pidfd_getfd: take a descriptor from bwrap's pid 1", "seccomp (SIGSYS)",
       KILLED, "root", "ok:took fd 0"),   # control: fd 0 of a `sleep` the test started
    _a("tiocsti", "ioctl(TIOCSTI) on stdin: type into a terminal", "seccomp (ioctl request not allowed: SIGSYS)",
       KILLED, "root", "OSError:ENOTTY"),
    _a("x32_abi", "getpid through the x32 syscall ABI (filter bypass)", "seccomp (x32/foreign ABI: SIGSYS)",
       KILLED, "root", re.compile(r"OSError:ENOSYS|ok:x32 getpid returned \d+")),
    _a("tgkill_pid1", "tgkill(1, 1, SIGABRT), the one signal call allowed (abort())",
       "Landlock signal scope (EPERM)", "PermissionError:EPERM", "landlock-off", "ok:SIGABRT sent to 1"),
    _a("tgkill_host", "tgkill SIGABRT to a host `sleep` of the same worker uid",
       "pid namespace (ESRCH)", "ProcessLookupError:ESRCH", "worker", re.compile(r"ok:SIGABRT sent to host pid \d+")),
    _a("unshare_userns", "unshare(CLONE_NEWUSER)", "seccomp (SIGSYS)", KILLED, "root-alone", "ok:new user namespace"),
    _a("clone_newns", "clone(CLONE_NEWUSER + CLONE_NEWNS + CLONE_NEWNET), a child process", "seccomp (SIGSYS)", KILLED,
       "root", "ok:child in new namespaces"),
    _a("clone_thread_newns", "clone a thread (CLONE_THREAD passes the filter) with CLONE_NEWNS + CLONE_NEWNET",
       "capabilities (worker uid, bwrap --cap-drop ALL: EPERM)", "PermissionError:EPERM",
       "root", re.compile(r"ok:thread \d+ made in new mount and network namespaces")),
    _a("mount_tmpfs", "mount(2) on /tmp (bogus fs type)", "seccomp (SIGSYS)", KILLED, "root", "OSError:ENODEV"),
    _a("chroot", "chroot(2)", "seccomp (SIGSYS)", KILLED, "root", "FileNotFoundError:ENOENT"),
    _a("personality", "personality(READ_IMPLIES_EXEC)", "seccomp (SIGSYS)", KILLED,
       "root", "ok:READ_IMPLIES_EXEC set"),
    # ---------------------------------------------------------------- kernel surfaces
    _a("bpf", "bpf(BPF_PROG_LOAD) with an invalid attr", "seccomp (SIGSYS)", KILLED, "root", "OSError:E2BIG"),
    _a("perf_event_open", "perf_event_open with a NULL attr", "seccomp (SIGSYS)", KILLED, "root", "OSError:EFAULT"),
    _a("madvise_remove", "madvise(MADV_REMOVE) on a shared memfd mapping: punch a hole (an output arena's pages, "
       "emptied while the supervisor copies them)", "seccomp (madvise advice not allowed: SIGSYS)", KILLED,
       "worker", "ok:hole punched (st_blocks 16 -> 0)"),
    _a("madvise_remove_high_bits", "the same with bit 32 of the advice set (0x1_00000009: the kernel reads an int; "
       "a filter comparing 64 bits against 9 would let it pass)", "seccomp (advices allowed by exact value: SIGSYS)",
       KILLED, "worker", "ok:hole punched (st_blocks 16 -> 0)"),
    _a("io_uring_setup", "io_uring_setup(0, NULL)", "seccomp (SIGSYS)", KILLED, "root", "OSError:EFAULT"),
    _a("userfaultfd", "userfaultfd with invalid flags", "seccomp (SIGSYS)", KILLED, "root", "OSError:EINVAL"),
    _a("keyctl", "keyctl(KEYCTL_GET_KEYRING_ID, session keyring)", "seccomp (SIGSYS)", KILLED,
       "root", re.compile(r"ok:session keyring \d+")),
    _a("add_key", "add_key with a bogus key type", "seccomp (SIGSYS)", KILLED, "root", "PermissionError:EPERM"),
    # This host's kernel has no module or kexec support (ENOSYS unconfined): the kill is the filter's alone.
    _a("kexec_load", "kexec_load with invalid flags", "seccomp (SIGSYS)", KILLED,
       "root", re.compile(r"OSError:(ENOSYS|EINVAL|EPERM)")),
    _a("init_module", "init_module with a non-ELF image", "seccomp (SIGSYS)", KILLED,
       "root", re.compile(r"OSError:(ENOSYS|ENOEXEC|EPERM)")),
    _a("finit_module", "finit_module(-1)", "seccomp (SIGSYS)", KILLED,
       "root", re.compile(r"OSError:(ENOSYS|EBADF|EPERM)")),
    # ---------------------------------------------------------------- resources
    _a("disk_fill", "fill /tmp with 40 MiB files (at most 120 MiB)", "tmpfs size 64 MiB (ENOSPC)",
       re.compile(r"OSError:ENOSPC after 6[0-4] MiB"), "worker", "ok:wrote 120 MiB"),
    _a("socket_dir_fill", "write 3 x 40 MiB files into /run/sealbox, the writable bind of a host directory",
       "Landlock (socket directory: make a socket, nothing else)",
       "PermissionError:EACCES after 0 MiB",
       "worker", "ok:wrote 120 MiB"),
    _a("file_size", "one file in /tmp past 64 MiB (bounded at 80 MiB)",
       "tmpfs size 64 MiB (ENOSPC; RLIMIT_FSIZE is the message limit, since hop memfds are files too)",
       re.compile(r"OSError:ENOSPC after 6[0-4] MiB"), "worker", "ok:wrote 80 MiB"),
    _a("thread_bomb", "start up to 200 threads", "cgroup pids.max 64",
       re.compile(r"RuntimeError:can't start new thread after \d+"), "pids-128", None),
    _a("memory_bomb", "touch 512 MiB under --memory 256M", "cgroup memory limit (OOM kill: exit 137)",
       "killed by SIGKILL", "memory-default", "ok:holding 512 MiB"),
]
BY_NAME = {a.name: a for a in ATTEMPTS}
assert len(BY_NAME) == len(ATTEMPTS)
KILLING = [a.name for a in ATTEMPTS if a.inside == KILLED]
OWN_RUN = ("thread_bomb", "memory_bomb")
BATCH = [a.name for a in ATTEMPTS if a.inside != KILLED and a.name not in OWN_RUN]
LANDLOCK_OFF = [a.name for a in ATTEMPTS if a.control == "landlock-off"]


# ---------------------------------------------------------------- running the probe

@dataclasses.dataclass
class Run:
    returncode: int
    outcomes: dict[str, str]
    started: list[str]
    stderr: str
    seconds: float

    def outcome(self, name: str) -> str:
        """The attempt's outcome; KILLED if a seccomp kill ended the run during it."""
        if name in self.outcomes:
            return self.outcomes[name]
        assert self.started and self.started[-1] == name, (name, self)
        if self.returncode == SIGSYS_EXIT:
            return KILLED
        if self.returncode == SIGKILL_EXIT:
            return "killed by SIGKILL"
        return f"died with exit {self.returncode}"


def _parse(proc: subprocess.CompletedProcess, seconds: float) -> Run:
    outcomes, started = {}, []
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            started.append(record["start"])
        else:
            outcomes[record["attempt"]] = record["outcome"]
    return Run(proc.returncode, outcomes, started, proc.stderr, seconds)


def _timed(command, **kwargs) -> Run:
    started = time.monotonic()
    # stdin /dev/null: the TIOCSTI control must never reach a real terminal.
    proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90, **kwargs)
    return _parse(proc, time.monotonic() - started)


def run_sandboxed(params: dict, attempts: list[str], memory: str | None = None) -> Run:
    """`sealbox sandbox run-python [--memory M] escape_probe.py PARAMS ATTEMPT...` (run as root)."""
    command = [SEALBOX, "sandbox", "run-python", *(["--memory", memory] if memory else []),
               str(PROBE), json.dumps(params), *attempts]
    return _timed(command, env={"PATH": "/usr/bin:/bin"})


RUN_TOOL = """
import dataclasses, json, sys
from sealbox.proto.contract import ToolRun
from sealbox.sandbox.launcher import run_tool
from sealbox.sandbox.profile import SandboxProfile
from sealbox.sandbox.tools import SCRIPT_IN_SANDBOX
overrides, script, args = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
with open(script, "rb") as f:
    source = f.read()
profile = dataclasses.replace(SandboxProfile.for_model("mlx"), **overrides)
sys.exit(run_tool(profile, ToolRun("script", SCRIPT_IN_SANDBOX, tuple(args)),
                  extra_files={SCRIPT_IN_SANDBOX: source}))
"""


def run_with_profile(overrides: dict, params: dict, attempts: list[str]) -> Run:
    """The control sandbox: run-python's own path (run_tool) with one profile field changed."""
    return _timed([PYTHON, "-c", RUN_TOOL, json.dumps(overrides), str(PROBE), json.dumps(params), *attempts],
                  env={"PATH": "/usr/bin:/bin"}, cwd="/")


def run_unconfined(params: dict, attempts: list[str], as_worker: bool) -> Run:
    """The probe in a plain subprocess: as the worker uid, or as root."""
    kwargs = {}
    if as_worker:
        entry = pwd.getpwnam(WORKER_USER)
        kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    return _timed([PYTHON, "-c", PROBE.read_text(), json.dumps(params), *attempts],
                  env={"PATH": "/usr/bin:/bin", "HOME": "/"}, cwd="/", **kwargs)


# ---------------------------------------------------------------- host setup

def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _host_block_device() -> str | None:
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith(("loop", "ram", "zram", "nbd")):
            continue
        if os.path.exists(f"/dev/{name}"):
            return f"/dev/{name}"
    return None


def _preconditions(block_device: str | None) -> dict[str, str]:
    """Attempts whose precondition this host lacks: {name: why skipped}."""
    missing = {}
    if not _ipv6_loopback():
        missing["tcp6_connect"] = "no IPv6 loopback (::1) on this host"
    if not os.path.exists("/dev/mem"):
        missing["dev_mem"] = "the host has no /dev/mem (CONFIG_DEVMEM off): nothing to hide"
    if block_device is None:
        missing["dev_block"] = "the host has no block device besides loop/ram/zram"
    if not os.path.exists("/dev/kmsg"):
        missing["dev_kmsg"] = "the host has no /dev/kmsg"
    if not hasattr(socket, "AF_PACKET"):
        missing["packet_socket"] = "no AF_PACKET in this Python"
    return missing


def _drain(sock: socket.socket, stream: bool) -> list:
    got = []
    while True:
        try:
            if stream:
                conn, _ = sock.accept()
                conn.close()
                got.append("connection")
            else:
                got.append(sock.recv(256))
        except (BlockingIOError, socket.timeout):
            return got


class Host:
    """What the test sets up on the host for the attempts to aim at."""

    def __init__(self):
        entry = pwd.getpwnam(WORKER_USER)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        os.makedirs(RUN_ROOT, mode=0o755, exist_ok=True)
        self.dir = os.path.join(RUN_ROOT, uuid.uuid4().hex[:12])
        os.mkdir(self.dir, 0o755)
        self.secret = os.path.join(self.dir, "secret")
        with open(self.secret, "w") as f:
            f.write("sealbox-escape-secret")
        os.chmod(self.secret, 0o600)
        self.world_readable = os.path.join(self.dir, "world-readable")
        with open(self.world_readable, "w") as f:
            f.write("world-readable")
        os.chmod(self.world_readable, 0o644)
        self.scratch = os.path.join(self.dir, "scratch")   # the root control's FIFO and mount target
        os.mkdir(self.scratch, 0o700)
        self.worker_scratch = os.path.join(self.dir, "worker-scratch")   # the worker control's fill dir
        os.mkdir(self.worker_scratch, 0o700)
        os.chown(self.worker_scratch, self.uid, self.gid)
        self.listeners: dict[str, tuple[socket.socket, bool]] = {}
        self._listen("tcp4_connect", socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0))
        self._listen("udp4_send", socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0))
        if _ipv6_loopback():
            self._listen("tcp6_connect", socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0))
        tag = uuid.uuid4().hex[:12]
        self._listen("abstract_unix_dgram", socket.AF_UNIX, socket.SOCK_DGRAM, f"\0sealbox-escape-dgram-{tag}")
        self._listen("abstract_unix_connect", socket.AF_UNIX, socket.SOCK_STREAM, f"\0sealbox-escape-stream-{tag}")
        self.daemon_socket = os.path.join(self.dir, "sealbox.sock")
        self._listen("daemon_socket_connect", socket.AF_UNIX, socket.SOCK_STREAM, self.daemon_socket)
        self.dgram_socket = os.path.join(self.dir, "dgram.sock")
        self._listen("daemon_dir_dgram", socket.AF_UNIX, socket.SOCK_DGRAM, self.dgram_socket)
        for path in (self.daemon_socket, self.dgram_socket):
            os.chmod(path, 0o666)
        # Host processes to aim at: one for the sandbox (must survive), one the worker control kills,
        # one (root's) for the ptrace/process_vm_readv/kill controls.
        self.sleepers = {
            key: subprocess.Popen(["sleep", "120"], **({"user": self.uid, "group": self.gid, "extra_groups": []}
                                                      if key != "root" else {}))
            for key in ("sandbox", "worker", "root")}
        self.block_device = _host_block_device()
        self.skipped = _preconditions(self.block_device)

    def _listen(self, attempt, family, kind, address):
        sock = socket.socket(family, kind)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(8)
        sock.setblocking(False)
        self.listeners[attempt] = (sock, kind == socket.SOCK_STREAM)

    def address(self, attempt) -> int:
        return self.listeners[attempt][0].getsockname()[1]

    def params(self, who: str) -> dict:
        code_dir = os.path.realpath(os.path.dirname(__import__("sealbox").__file__))
        params = {
            "tcp_port": self.address("tcp4_connect"), "udp_port": self.address("udp4_send"),
            "abstract_dgram": self.listeners["abstract_unix_dgram"][0].getsockname()[1:].decode(),
            "abstract_stream": self.listeners["abstract_unix_connect"][0].getsockname()[1:].decode(),
            "daemon_socket": self.daemon_socket, "dgram_socket": self.dgram_socket,
            "secret": self.secret, "world_readable": self.world_readable, "code_dir": code_dir,
            "block_device": self.block_device, "host_pid": self.sleepers["sandbox"].pid,
        }
        if "tcp6_connect" in self.listeners:
            params["tcp6_port"] = self.address("tcp6_connect")
        if who == "worker":
            params.update(host_pid=self.sleepers["worker"].pid, fill_dir=self.worker_scratch,
                          sock_dir=self.worker_scratch)
        elif who == "root":
            params.update(target_pid=self.sleepers["root"].pid, mknod_path=os.path.join(self.scratch, "fifo"),
                          mknod_fifo=True, mount_target=self.scratch)
        return params

    def received(self) -> dict[str, list]:
        return {attempt: _drain(sock, stream) for attempt, (sock, stream) in self.listeners.items()}

    def close(self):
        for sock, _ in self.listeners.values():
            sock.close()
        for proc in self.sleepers.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclasses.dataclass
class Results:
    host: Host
    sandbox: dict[str, Run]            # key: "batch", an attempt name, or a special run
    control: dict[str, Run]
    received_from_sandbox: dict[str, list]
    received_from_control: dict[str, list]
    sandbox_sleeper_alive: bool
    worker_sleeper_status: int | None

    def inside(self, name: str) -> str:
        run = self.sandbox["batch"] if name in BATCH else self.sandbox[name]
        return run.outcome(name)


@pytest.fixture(scope="module")
def results():
    host = Host()
    try:
        runnable = [a for a in ATTEMPTS if a.name not in host.skipped]
        batch = [n for n in BATCH if n not in host.skipped]
        jobs = {"batch": (run_sandboxed, host.params("sandbox"), batch)}
        for name in KILLING:
            jobs[name] = (run_sandboxed, host.params("sandbox"), [name])
        jobs["thread_bomb"] = (run_sandboxed, {}, ["thread_bomb"])
        jobs["memory_bomb"] = (lambda p, a: run_sandboxed(p, a, memory="256M"), {"memory_mib": 512}, ["memory_bomb"])
        # Controls that are sandboxes with one layer changed.
        jobs["landlock-off"] = (lambda p, a: run_with_profile({"landlock": False}, p, a), {}, LANDLOCK_OFF)
        jobs["pids-128"] = (lambda p, a: run_with_profile({"pids_max": 2 * PIDS_MAX}, p, a), {}, ["thread_bomb"])
        jobs["memory-default"] = (run_sandboxed, {"memory_mib": 512}, ["memory_bomb"])
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            futures = {key: pool.submit(fn, params, attempts) for key, (fn, params, attempts) in jobs.items()}
            runs = {key: future.result() for key, future in futures.items()}
        sandbox_sleeper_alive = host.sleepers["sandbox"].poll() is None
        received_from_sandbox = host.received()

        # Unconfined controls (after the sandbox runs, so what the listeners got can be told apart).
        worker_list = [a.name for a in runnable if a.control == "worker"]
        root_list = [a.name for a in runnable if a.control == "root"]
        control = {
            "worker": run_unconfined(host.params("worker"), worker_list, as_worker=True),
            "root": run_unconfined(host.params("root"), root_list, as_worker=False),
        }
        for name in (a.name for a in runnable if a.control == "root-alone"):  # exec, traceme, unshare
            control[name] = run_unconfined(host.params("root"), [name], as_worker=False)
        for key in ("landlock-off", "pids-128", "memory-default"):
            control[key] = runs.pop(key)
        received_from_control = host.received()
        worker_sleeper = host.sleepers["worker"]
        try:
            worker_status = worker_sleeper.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker_status = None
        yield Results(host, runs, control, received_from_sandbox, received_from_control,
                      sandbox_sleeper_alive, worker_status)
    finally:
        host.close()


def _matches(expected, actual) -> bool:
    return bool(expected.fullmatch(actual)) if isinstance(expected, re.Pattern) else expected == actual


def _control_run(results: Results, attempt: Attempt) -> Run:
    """worker/root: the shared unconfined run; root-alone: a run of its own; else the changed sandbox."""
    return results.control[attempt.name if attempt.control == "root-alone" else attempt.control]


# ---------------------------------------------------------------- the attempts

@pytest.mark.parametrize("name", [a.name for a in ATTEMPTS if a.name not in OWN_RUN])
def test_escape_attempt_is_stopped(results, name):
    attempt = BY_NAME[name]
    if name in results.host.skipped:
        pytest.skip(results.host.skipped[name])
    inside = results.inside(name)
    assert _matches(attempt.inside, inside), f"{name}: expected {attempt.inside!r} ({attempt.layer}), got {inside!r}"
    if attempt.inside == KILLED:   # killed at this attempt, not before: its start line is the run's last
        run = results.sandbox[name]
        assert run.started == [name] and run.returncode == SIGSYS_EXIT, run
    # The control: the same probe code gets through where the layer under test is absent.
    control = _control_run(results, attempt)
    got = control.outcomes.get(name, f"no outcome (exit {control.returncode}, stderr {control.stderr[-300:]!r})")
    assert _matches(attempt.control_outcome, got), f"{name} control ({attempt.control}): {got!r}"


def test_network_listeners_got_nothing_from_the_sandbox_and_everything_from_the_controls(results):
    host = results.host
    for attempt in host.listeners:
        assert results.received_from_sandbox[attempt] == [], attempt
    expected = {
        "tcp4_connect": ["connection"], "tcp6_connect": ["connection"], "udp4_send": [b"escaped-udp"],
        "abstract_unix_dgram": [b"escaped-abstract"], "abstract_unix_connect": ["connection"],
        "daemon_socket_connect": ["connection"], "daemon_dir_dgram": [b"escaped-dgram"],
    }
    for attempt, got in results.received_from_control.items():
        assert got == expected[attempt], attempt


def test_host_processes_are_not_signalled_from_the_sandbox(results):
    assert results.sandbox_sleeper_alive                          # tgkill_host and kill_pid1 reached nothing
    assert results.worker_sleeper_status == -signal.SIGABRT      # while the unconfined control's tgkill landed


def test_thread_bomb_stops_at_the_pids_limit(results):
    inside = results.inside("thread_bomb")
    control = results.control["pids-128"].outcome("thread_bomb")
    pattern = re.compile(r"RuntimeError:can't start new thread after (\d+)")
    threads, threads_128 = int(pattern.fullmatch(inside).group(1)), int(pattern.fullmatch(control).group(1))
    assert results.sandbox["thread_bomb"].returncode == 0
    # The same processes and threads around the bomb in both runs: the difference is exactly pids.max's.
    assert threads_128 - threads == PIDS_MAX, (threads, threads_128)
    assert PIDS_MAX - 8 <= threads < PIDS_MAX


def test_memory_over_the_limit_is_oom_killed(results):
    run = results.sandbox["memory_bomb"]
    assert run.returncode == SIGKILL_EXIT and run.started == ["memory_bomb"] and not run.outcomes, run
    control = results.control["memory-default"]   # the default 2 GiB limit: the same 512 MiB fits
    assert control.returncode == 0 and control.outcome("memory_bomb") == "ok:holding 512 MiB", control


def test_every_attempt_is_in_the_table():
    """SECURITY.md's table of escape attempts has one row per attempt, and no others."""
    rows = {}
    for line in ESCAPES_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert sorted(rows) == sorted(BY_NAME)
    assert len(ATTEMPTS) >= 25


