"""The kernel sandbox layers, each applied for real in a child process and then fed the bad thing.

No layer is mocked: seccomp filters are loaded into child processes (and
into a worker inside bubblewrap), Landlock rulesets restrict children,
cgroups really OOM-kill and stop fork bombs.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest

from sealbox.sandbox import cgroups, landlock, limits, seccomp
from sealbox.sandbox.profile import runtime_paths_for

PYTHON = sys.executable
REPO = str(pathlib.Path(__file__).resolve().parents[2])
SIGSYS = signal.SIGSYS
RUN_ROOT = "/run/sealbox-test-layers"   # readable by the worker uid (pytest's tmp_path is not)
WORKER_USER = "sealbox-worker"

linux_x86_64 = pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                                  reason="the kernel layers are Linux x86_64 code")
pytestmark = linux_x86_64


def run_child(code: str, *, pass_fds=(), preexec_fn=None, timeout=60, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", textwrap.dedent(code)], pass_fds=pass_fds, preexec_fn=preexec_fn,
                          capture_output=True, text=True, timeout=timeout, env=env)


# ---------------------------------------------------------------- seccomp

def filter_fd(bpf: bytes) -> int:
    return seccomp.bpf_memfd(bpf)


LOAD = """
import os, sys
from sealbox.sandbox import seccomp
seccomp.load_stage2_from_fd({fd})
assert "pyseccomp" not in sys.modules, "loading a filter must not need libseccomp"
print("confined", flush=True)
"""


def run_filtered(bpf: bytes, body: str) -> subprocess.CompletedProcess:
    fd = filter_fd(bpf)
    try:
        return run_child(LOAD.format(fd=fd) + textwrap.dedent(body), pass_fds=(fd,))
    finally:
        os.close(fd)


def test_stage2_kills_execve_with_sigsys():
    result = run_filtered(seccomp.stage2_bpf("mlx"), """
        with open(os.devnull, "w") as f:   # ordinary syscalls still work
            f.write("x")
        print("io ok", flush=True)
        os.execv("/bin/true", ["true"])
        print("exec returned")
    """)
    assert result.stdout.split() == ["confined", "io", "ok"], result.stderr
    assert result.returncode == -SIGSYS


def test_stage2_kills_landlock_after_start():
    result = run_filtered(seccomp.stage2_bpf("flux"), """
        from sealbox.sandbox import landlock
        landlock.abi_version()   # landlock_create_ruleset: a start-only call
        print("not killed")
    """)
    assert result.stdout.split() == ["confined"]
    assert result.returncode == -SIGSYS


@pytest.mark.parametrize("attempt", [
    "ctypes.CDLL(None).ptrace(0, 0, 0, 0)",   # PTRACE_TRACEME: not on the list
    "os.fork()",                               # clone without CLONE_THREAD
    "ctypes.CDLL(None).personality(0x0400000)",  # READ_IMPLIES_EXEC
    "ctypes.CDLL(None).syscall(0x40000000 | 39)",  # getpid through the x32 ABI
    "import fcntl; fcntl.fcntl(1, fcntl.F_SETOWN, 1)",  # SIGIO as a signal channel
    "ctypes.CDLL(None).ioctl(0, 0x5412, ctypes.c_char_p(b'x'))",  # TIOCSTI: type into a terminal
    "ctypes.CDLL(None).unshare(0x10000000)",    # a new user namespace
])
def test_stage1_kills_what_a_worker_never_does(attempt):
    result = run_filtered(seccomp.stage1_bpf("mlx"), f"""
        import ctypes
        {attempt}
        print("survived")
    """)
    assert result.stdout.split() == ["confined"], result.stderr
    assert result.returncode == -SIGSYS


@pytest.mark.parametrize("engine", ["mlx", "flux"])
def test_every_engine_may_seal_a_memfd_for_the_hop(engine):
    """The hop (proto/hop.py) sends large responses as sealed memfds and maps the supervisor's."""
    result = run_filtered(seccomp.stage1_bpf(engine), """
        from sealbox.proto import hop
        fd = hop.body_memfd([b"x" * 100])
        body = hop._map_memfd(fd, 100)
        os.close(fd)
        print("survived", len(body))
    """)
    assert result.stdout.split() == ["confined", "survived", "100"], result.stderr
    assert result.returncode == 0


@pytest.mark.parametrize("call", ["eventfd2", "epoll_wait", "setsockopt"])
def test_grpc_only_syscalls_are_gone(call):
    """The worker serves no gRPC any more: its event engine's syscalls kill it (SECURITY.md)."""
    args = {"eventfd2": "c_long(0), c_long(0)", "epoll_wait": "c_long(-1), c_long(0), c_long(1), c_long(0)",
            "setsockopt": "c_long(-1), c_long(1), c_long(2), c_long(0), c_long(0)"}[call]
    result = run_filtered(seccomp.stage1_bpf("mlx"), f"""
        import ctypes
        from ctypes import c_long
        nr = {{"eventfd2": 290, "epoll_wait": 232, "setsockopt": 54}}["{call}"]
        ctypes.CDLL(None).syscall(c_long(nr), {args})
        print("survived")
    """)
    assert result.stdout.split() == ["confined"]
    assert result.returncode == -SIGSYS


def test_the_x32_attempt_is_harmless_without_a_filter():
    """Control for the x32 case above: the same call alone does not kill a process."""
    result = run_child("import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 39); print('survived')")
    assert result.stdout.split() == ["survived"]


I386_GETPID = """
import ctypes, mmap
code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])   # mov eax, 20 (i386 getpid); int 0x80; ret
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
print("pid", fn(), flush=True)
"""


def test_stage1_kills_a_foreign_architecture_syscall():
    control = run_child(I386_GETPID)
    if control.returncode != 0:
        pytest.skip(f"this kernel has no i386 syscall entry (control exited {control.returncode})")
    result = run_filtered(seccomp.stage1_bpf("flux"), I386_GETPID)
    assert result.stdout.split() == ["confined"]
    assert result.returncode == -SIGSYS


def test_stage1_refuses_internet_sockets_softly():
    """gRPC probes AF_INET/AF_INET6 at start: those get EAFNOSUPPORT, not a kill."""
    result = run_filtered(seccomp.stage1_bpf("mlx"), """
        import socket
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK):
            try:
                socket.socket(family, socket.SOCK_DGRAM if family == socket.AF_NETLINK else socket.SOCK_STREAM)
                print("created")
            except OSError as exc:
                print(exc.errno)
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        print("unix")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["confined"] + [str(errno.EAFNOSUPPORT)] * 3 + ["unix"]


def test_stage1_lets_abort_show_as_sigabrt():
    """A crash inside MLX (abort()) must read as SIGABRT, not as a seccomp violation."""
    result = run_filtered(seccomp.stage1_bpf("mlx"), "os.abort()")
    assert result.returncode == -signal.SIGABRT


def test_filters_refuse_unknown_engines_and_bad_programs():
    with pytest.raises(seccomp.SeccompError, match="no syscall allowlist for engine 'julia'"):
        seccomp.stage1_bpf("julia")
    with pytest.raises(seccomp.SeccompError, match="not a BPF program"):
        seccomp.load_stage2(b"\x00" * 12)
    ok, detail = seccomp.seccomp_available()
    assert ok, detail


# A stand-in worker: the real sequence (imports, stage 2 from an fd, the hop on a Unix socket with a
# reader thread and one compute thread, MLX or numpy). Call id 1 doubles the body (float32), 2 probes
# AF_INET, 3 execs a shell.
WORKER = """
import os, sys, signal, threading
from concurrent import futures
engine, sock, stage2_fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
import numpy as np
if engine == "mlx":
    import mlx.core as mx
from sealbox.proto import hop
from sealbox.sandbox import seccomp
seccomp.load_stage2_from_fd(stage2_fd)
assert "pyseccomp" not in sys.modules and "grpc" not in sys.modules
compute = futures.ThreadPoolExecutor(max_workers=1)   # MLX streams belong to one thread

def double(body):
    x = np.frombuffer(bytes(body), np.float32)
    if engine == "mlx":
        return compute.submit(lambda: np.array(mx.array(x) * 2).tobytes()).result()
    if x.size <= 64:   # OpenBLAS's matmul
        return (x @ np.eye(x.size, dtype=np.float32) * 2).tobytes()
    return (x * 2).tobytes()

def probe():
    try:
        import socket
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        return b"inet created"
    except OSError as exc:
        return str(exc.errno).encode()

def serve(conn):
    while True:
        record = hop.recv(conn, 2**28, hop.TO_WORKER)
        if record.call_id == 1:
            hop.send(conn, hop.RESPONSE, 1, [double(record.body)], flags=hop.FINAL)
        elif record.call_id == 2:
            hop.send(conn, hop.RESPONSE, 2, [probe()], flags=hop.FINAL)
        else:
            os.execv("/bin/sh", ["sh", "-c", "echo escaped"])
        hop.release(record.body)

listener = hop.listen(sock)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@pytest.fixture
def run_dir():
    """A directory the worker uid can read, with a socket directory it can write."""
    entry = pwd.getpwnam(WORKER_USER)
    os.makedirs(RUN_ROOT, mode=0o755, exist_ok=True)
    os.chmod(RUN_ROOT, 0o755)
    path = pathlib.Path(RUN_ROOT) / uuid.uuid4().hex[:12]
    path.mkdir(mode=0o755)
    (path / "sock").mkdir(mode=0o700)
    os.chown(path / "sock", entry.pw_uid, entry.pw_gid)
    (path / "worker.py").write_text(WORKER)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def bwrap_worker(run_dir: pathlib.Path, engine: str, stage1_fd: int, stage2_fd: int) -> subprocess.Popen:
    entry = pwd.getpwnam(WORKER_USER)
    # The runtime the launcher would bind: /usr, the venv and sealbox's code (the checkout only when
    # installed editable; a CI clone may sit in a directory the worker user cannot enter).
    binds = [a for path in runtime_paths_for(PYTHON) for a in ("--ro-bind", path, path)]
    args = ["/usr/bin/bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--clearenv", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
            *binds, "--ro-bind", str(run_dir / "worker.py"), "/worker.py",
            "--bind", str(run_dir / "sock"), "/run/w", "--seccomp", str(stage1_fd)]
    for key, value in limits.WORKER_ENVIRONMENT.items():
        args += ["--setenv", key, value]
    args += ["--", PYTHON, "/worker.py", engine, "/run/w/s.sock", str(stage2_fd)]
    return subprocess.Popen(args, pass_fds=(stage1_fd, stage2_fd), user=entry.pw_uid, group=entry.pw_gid,
                            extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"}, cwd="/")


@pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")
@pytest.mark.parametrize("engine", ["mlx", "flux"])
def test_both_stages_in_bubblewrap_serve_the_hop_and_kill_exec(run_dir, engine):
    import numpy as np
    from sealbox.proto import hop

    stage1_fd, stage2_fd = filter_fd(seccomp.stage1_bpf(engine)), filter_fd(seccomp.stage2_bpf(engine))
    try:
        proc = bwrap_worker(run_dir, engine, stage1_fd, stage2_fd)
    finally:
        os.close(stage1_fd)
        os.close(stage2_fd)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        conn = hop.connect(f"{run_dir}/sock/s.sock")
        conn.settimeout(30)
        for rows in (8, 2**18):   # inline, then memfd-sized both ways
            x = np.arange(rows, dtype=np.float32)
            hop.send(conn, hop.INFER, 1, [x.tobytes()])
            answer = hop.recv(conn, 2**28, hop.TO_SUPERVISOR)
            assert np.array_equal(np.frombuffer(bytes(answer.body), np.float32), x * 2)
            hop.release(answer.body)
        hop.send(conn, hop.INFER, 2, [b""])
        assert bytes(hop.recv(conn, 2**16, hop.TO_SUPERVISOR).body) == str(errno.EAFNOSUPPORT).encode()
        hop.send(conn, hop.INFER, 3, [b""])
        with pytest.raises(hop.Closed):
            hop.recv(conn, 2**16, hop.TO_SUPERVISOR)
        conn.close()
        # bubblewrap's pid 1 reports the worker's death by signal as 128 + signal.
        assert proc.wait(timeout=30) == 128 + SIGSYS
        assert b"escaped" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- Landlock

LANDLOCK_CHILD = """
import errno, json, os, socket, sys
from sealbox.sandbox import landlock
ro, rw, secret, port, memfd = json.loads(sys.argv[1])
applied = landlock.restrict_self(read_only=ro, read_write=rw) if sys.argv[2] == "confine" else 0
out = {"abi": applied}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode[exc.errno]
attempt("read_allowed", lambda: open(ro[-1]).read())
attempt("read_outside", lambda: open(secret).read())
attempt("list_root", lambda: os.listdir("/"))
attempt("write_read_only", lambda: open(ro[-1], "a").write("x"))
attempt("write_rw", lambda: open(os.path.join(rw[0], "new"), "w").write("x"))
attempt("unix_socket_in_rw", lambda: socket.socket(socket.AF_UNIX).bind(os.path.join(rw[0], sys.argv[2])))
attempt("tcp_connect", lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
attempt("signal_parent", lambda: os.kill(os.getppid(), 0))
attempt("read_memfd", lambda: open(f"/proc/self/fd/{memfd}", "rb").read())
print(json.dumps(out))
"""


@pytest.fixture
def landlock_paths(tmp_path):
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("allowed")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    rw = tmp_path / "rw"
    rw.mkdir()
    listener = socket.create_server(("127.0.0.1", 0))
    memfd = os.memfd_create("model")
    os.write(memfd, b"weights")
    runtime = sorted({"/usr", os.path.realpath(sys.prefix), REPO})
    yield runtime + [str(allowed)], [str(rw)], str(secret), listener.getsockname()[1], memfd
    listener.close()
    os.close(memfd)


def run_landlock_child(paths, mode: str) -> dict:
    result = subprocess.run([PYTHON, "-c", LANDLOCK_CHILD, json.dumps(paths), mode], pass_fds=(paths[-1],),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_landlock_confines_files_tcp_and_signals(landlock_paths):
    assert landlock.abi_version() >= 6
    unconfined = run_landlock_child(landlock_paths, "control")
    # Control: without Landlock every attempt succeeds, so each refusal below is Landlock's doing.
    assert set(unconfined.values()) == {0, "ok"}, unconfined
    confined = run_landlock_child(landlock_paths, "confine")
    assert confined == {
        "abi": landlock.abi_version(),
        "read_allowed": "ok",
        "read_outside": "EACCES",
        "list_root": "EACCES",
        "write_read_only": "EACCES",
        "write_rw": "ok",
        "unix_socket_in_rw": "ok",
        "tcp_connect": "EACCES",
        "signal_parent": "EPERM",
        "read_memfd": "ok",     # the sealed model memfds stay readable
    }


def test_landlock_refuses_a_process_with_threads():
    result = run_child("""
        import threading, time
        from sealbox.sandbox import landlock
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
        try:
            landlock.restrict_self(["/usr"], [])
        except landlock.LandlockError as exc:
            print(exc)
    """)
    assert "2 threads run already" in result.stdout, result.stderr


def test_landlock_refuses_a_missing_path():
    result = run_child("""
        from sealbox.sandbox import landlock
        try:
            landlock.restrict_self(["/usr", "/nonexistent/model"], [])
        except landlock.LandlockError as exc:
            print(exc)
        open("/etc/hostname").read()   # and nothing was restricted
        print("unrestricted")
    """)
    assert result.stdout.splitlines() == [
        "landlock: cannot open '/nonexistent/model' for a rule: No such file or directory", "unrestricted"]


# ---------------------------------------------------------------- cgroups

@pytest.fixture
def make_cgroup():
    made = []

    def make(memory_bytes=256 * 2**20, pids_max=64):
        group = cgroups.WorkerCgroup.create(f"test-{uuid.uuid4().hex[:10]}", memory_bytes, pids_max)
        made.append(group)
        return group
    yield make
    for group in made:
        group.kill()
        group.remove()
        for path in (group.memory_dir, group.pids_dir, group.v2_dir):
            assert path is None or not os.path.exists(path), f"{path} left behind"


def test_cgroup_memory_limit_oom_kills(make_cgroup):
    group = make_cgroup(memory_bytes=64 * 2**20)
    child = subprocess.run([PYTHON, "-c", "b = bytearray(512 * 2**20); print('survived')"],
                           preexec_fn=group.attach_self, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert "survived" not in child.stdout
    assert group.oom_killed()


def test_cgroup_without_pressure_reports_no_oom(make_cgroup):
    group = make_cgroup(memory_bytes=256 * 2**20)
    child = subprocess.run([PYTHON, "-c", "b = bytearray(16 * 2**20); print('fine')"],
                           preexec_fn=group.attach_self, capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == "fine"
    assert not group.oom_killed()
    assert group.pids_limit_hit() is False


FORK_BOMB = """
import os, sys, time
count = 0
while count < 1000:          # bounded even if the limit failed
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    count += 1
print(count, flush=True)
"""


def test_cgroup_pids_limit_stops_a_fork_bomb(make_cgroup):
    group = make_cgroup(pids_max=16)
    child = subprocess.Popen([PYTHON, "-c", FORK_BOMB], preexec_fn=group.attach_self,
                             stdout=subprocess.PIPE, text=True)
    count = int(child.stdout.readline())
    assert 0 < count < 16            # the parent itself holds one of the 16
    assert group.pids_limit_hit() is True
    group.kill()
    child.wait(timeout=10)


def test_cgroup_kill_takes_the_whole_tree(make_cgroup):
    group = make_cgroup()
    tree = subprocess.Popen(
        [PYTHON, "-c", "import os, subprocess, sys, time\n"
                       "kids = [subprocess.Popen(['sleep', '60']) for _ in range(3)]\n"
                       "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
                       "time.sleep(60)"],
        preexec_fn=group.attach_self, stdout=subprocess.PIPE, text=True)
    kids = [int(p) for p in tree.stdout.readline().split()]
    assert set(group.pids()) == {tree.pid, *kids}
    group.kill()
    assert tree.wait(timeout=10) == -signal.SIGKILL
    assert group.pids() == []
    for pid in kids:   # orphans reparented to init and reaped, or zombies: none runs
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_cgroup_kill_without_cgroup_kill_file(make_cgroup):
    """Hosts without cgroup.kill (v1 only, kernels before 5.14): SIGKILL every member until none is left."""
    group = make_cgroup()
    group.v2_dir = None   # this group's unified directory stays a member list, but kill() may not use it
    tree = subprocess.Popen(
        [PYTHON, "-c", "import os, time\n"
                       "for _ in range(4):\n"
                       "    if os.fork() == 0:\n"
                       "        break\n"
                       "time.sleep(60)"],
        preexec_fn=group.attach_self)
    deadline = time.monotonic() + 10
    while len(group.pids()) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(group.pids()) == 5
    group.kill()
    assert group.pids() == []
    assert tree.wait(timeout=10) == -signal.SIGKILL


def test_cgroup_attach_moves_a_running_process(make_cgroup):
    group = make_cgroup()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        group.attach(sleeper.pid)
        assert group.pids() == [sleeper.pid]
    finally:
        group.kill()
        sleeper.wait(timeout=10)


def test_killing_a_worker_whose_group_was_removed_meanwhile_is_done(make_cgroup):
    """The worker's watcher removes its group once it has reaped the worker; a kill that the supervisor
    makes at the same moment (an inference timeout) finds the group gone: nothing left to kill, no error.
    (CI saw the same race surface as ENODEV, reading cgroup.procs of a group being removed.)"""
    group = make_cgroup()
    sleeper = subprocess.Popen(["sleep", "60"], preexec_fn=group.attach_self)
    group.kill()
    sleeper.wait(timeout=10)
    group.remove()
    assert group.pids() == []
    group.kill()   # raised FileNotFoundError (or OSError ENODEV mid-removal) before


def test_cgroup_refuses_bad_names():
    for name in ("../escape", "", "a/b", ".."):
        with pytest.raises(cgroups.CgroupError, match="name"):
            cgroups.WorkerCgroup.create(name, 2**20, 8)


# ---------------------------------------------------------------- rlimits

def test_rlimits_apply_in_the_child():
    result = subprocess.run([PYTHON, "-c", textwrap.dedent("""
        import errno, os, resource, tempfile
        print(resource.getrlimit(resource.RLIMIT_NOFILE), resource.getrlimit(resource.RLIMIT_FSIZE),
              resource.getrlimit(resource.RLIMIT_CORE))
        fd, _ = tempfile.mkstemp()
        try:
            os.write(fd, b"x" * 4096)   # up to the limit: fine
            os.write(fd, b"x")
        except OSError as exc:
            print("fsize", errno.errorcode[exc.errno])
        os.unlink(_)
        files = []
        try:
            for _ in range(64):
                files.append(open(os.devnull))
        except OSError as exc:
            print("nofile", errno.errorcode[exc.errno])
        try:
            bytearray(512 * 2**20)
        except MemoryError:
            print("address space")
    """)], preexec_fn=lambda: limits.apply_rlimits(nofile=32, fsize=4096, core=0, address_space=256 * 2**20),
        capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["(32, 32) (4096, 4096) (0, 0)", "fsize EFBIG", "nofile EMFILE",
                                          "address space"], result.stderr
    # and the parent is untouched
    assert resource.getrlimit(resource.RLIMIT_NOFILE) != (32, 32)
