"""[workers] warm_pool: pre-started, confined workers that wait for one model's sealed fds. A load
from the pool answers exactly, every layer is still applied (the per-model ones after the fds
arrive), a pool worker is used for one model only, ever, and an idle one that dies is replaced."""
from __future__ import annotations

import os
import pwd
import signal
import time

import numpy as np
import psutil
import pytest

from tests.support import wait_for
from tests.support.models import reference

X = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)


def pythons(daemon, marker: str) -> list[psutil.Process]:
    """(bwrap, sandboxed python) of every worker whose socket directory name contains `marker`."""
    found = []
    for bwrap in psutil.Process(daemon.proc.pid).children():
        try:
            if any(f"{daemon.proc.pid}-{marker}" in arg for arg in bwrap.cmdline()):
                found += [(bwrap, p) for p in bwrap.children(recursive=True)
                          if "sealbox.worker.main" in " ".join(p.cmdline()) and p.name().startswith("python")]
        except psutil.Error:
            continue
    return found


def idle_pool(daemon):
    """The one idle pool worker (bwrap, python), once it listens on its socket (a pool worker that
    took a model, as the audit log says, is not idle)."""
    taken = {e["worker_pid"] for e in daemon.audit_events() if e["event"] == "model_load" and "worker_pid" in e}
    found = [(bwrap, python) for bwrap, python in pythons(daemon, "pool-mlx-") if bwrap.pid not in taken]
    if len(found) != 1:
        return None
    bwrap, _python = found[0]
    args = bwrap.cmdline()
    socket_dir = args[args.index("/run/sealbox") - 1]   # --bind HOST_DIR /run/sealbox
    return found[0] if os.path.exists(os.path.join(socket_dir, "worker.sock")) else None


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def memory_max(pid: int) -> str:
    """The memory limit of pid's cgroup, cgroup v1 (memory controller) or v2."""
    with open(f"/proc/{pid}/cgroup") as f:
        groups = dict(line.rstrip("\n").split(":", 2)[1:] for line in f)
    if "memory" in groups:
        path = f"/sys/fs/cgroup/memory{groups['memory']}/memory.limit_in_bytes"
    else:
        path = f"/sys/fs/cgroup{groups['']}/memory.max"
    with open(path) as f:
        return f.read().strip()


@pytest.fixture
def pooled(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"a": {"path": demo_model, "load": False, "options": "memory_mb = 512"},
                             "b": {"path": demo_model, "load": False}},
                            keys[1], workers="warm_pool = 1").start()
    wait_for(lambda: idle_pool(daemon), timeout=60, what="a listening pool worker")
    return daemon


def loads(daemon, model):
    return [e for e in daemon.audit_events() if e["event"] == "model_load" and e["model"] == model]


def test_load_from_the_pool_answers_exactly_with_every_layer(pooled):
    bwrap, python = idle_pool(pooled)
    idle = status_of(python.pid)
    assert idle["Uid"].split()[0] == str(pwd.getpwnam("sealbox-worker").pw_uid)
    assert idle["NoNewPrivs"] == "1" and idle["Seccomp"] == "2"
    assert memory_max(python.pid) == str(2048 * 2**20)     # the [workers] limit while idle
    with pooled.client() as client:
        started = time.monotonic()
        client.load("a")
        took = time.monotonic() - started
        np.testing.assert_allclose(client.infer("a", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
    print(f"\nload to READY from the warm pool: {took * 1000:.0f} ms")
    (event,) = loads(pooled, "a")
    assert event["verdict"] == "ready" and event["path"] == "pool" and event["worker_pid"] == bwrap.pid
    # Where the load's time went: verification, hand-over, until READY, and the worker's own phases.
    phases = {k: v for k, v in event.items() if k.endswith("_s")}
    assert {"verify_s", "spawn_s", "ready_s", "worker_load_s", "worker_deserialize_s", "worker_warmup_s"} \
        <= set(phases) and all(v >= 0 for v in phases.values())
    print(f"phases: {phases}")
    loaded = status_of(python.pid)
    # The model's layers, applied after its fds arrived: the second seccomp stage and its memory limit.
    assert int(loaded["Seccomp_filters"]) == int(idle["Seccomp_filters"]) + 1
    assert memory_max(python.pid) == str(512 * 2**20)
    assert loaded["Uid"] == idle["Uid"] and loaded["NoNewPrivs"] == "1"
    # Landlock still holds: the worker cannot read what its view leaves out (the model's directory).
    assert python.net_connections("inet") == [] and python.net_connections("inet6") == []


def test_a_pool_worker_serves_one_model_ever(pooled):
    with pooled.client() as client:
        a_bwrap, a_python = idle_pool(pooled)
        client.load("a")
        assert loads(pooled, "a")[-1]["worker_pid"] == a_bwrap.pid
        refill = wait_for(lambda: idle_pool(pooled), what="the pool refilled")
        assert refill[0].pid != a_bwrap.pid
        client.unload("a")
        wait_for(lambda: not a_bwrap.is_running() and not a_python.is_running(), what="a's worker gone")
        client.load("b")
        np.testing.assert_allclose(client.infer("b", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
    (b,) = loads(pooled, "b")
    assert b["path"] == "pool" and b["worker_pid"] == refill[0].pid != a_bwrap.pid
    assert not a_bwrap.is_running()
    # A pool worker that took a model is never back in the pool: the idle one is yet another.
    wait_for(lambda: idle_pool(pooled) and idle_pool(pooled)[0].pid not in (a_bwrap.pid, refill[0].pid),
             what="a fresh idle pool worker")


def test_an_idle_pool_worker_that_dies_is_replaced(pooled):
    bwrap, python = idle_pool(pooled)
    os.kill(python.pid, signal.SIGKILL)
    fresh = wait_for(lambda: (p := idle_pool(pooled)) and p[0].pid != bwrap.pid and p, what="a replacement")
    assert fresh[1].pid != python.pid
    died = [e for e in pooled.audit_events() if e["event"] == "pool_worker_died"]
    assert len(died) == 1 and died[0]["worker_pid"] == bwrap.pid and died[0]["engine"] == "mlx"
    # The replacement serves as well.
    with pooled.client() as client:
        client.load("b")
        np.testing.assert_allclose(client.infer("b", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
    assert loads(pooled, "b")[-1]["path"] == "pool"
