"""`instances = N`: N sandboxed workers per model on one verification, least-loaded first, each
restarted on its own while the others serve; unload stops all, a hand-over replaces all."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import numpy as np
import psutil
import pytest

from tests.support import wait_for
from tests.support.models import reference


def instance_pythons(daemon, model: str = "demo") -> list[psutil.Process]:
    """The sandboxed python of each of the model's workers (found by its socket directory's name)."""
    marker = f"{daemon.proc.pid}-{model}-"
    found = []
    for bwrap in psutil.Process(daemon.proc.pid).children():
        try:
            if not any(marker in arg for arg in bwrap.cmdline()):
                continue
            for proc in bwrap.children(recursive=True):
                if "sealbox.worker.main" in " ".join(proc.cmdline()) and proc.name().startswith("python"):
                    found.append(proc)
        except psutil.Error:   # one being replaced right now
            continue
    return found


def reason(daemon, model: str = "demo"):
    with daemon.client() as client:
        entry = next(m for m in client.models() if m.name == model)
    return entry.state, entry.reason


def all_ready(daemon, n: int):
    pythons = instance_pythons(daemon)
    return pythons if len(pythons) == n and reason(daemon) == ("READY", f"{n}/{n} instances ready") else None


@pytest.fixture
def two(daemon_factory, demo_model, keys):
    return daemon_factory({"demo": {"path": demo_model, "options": "instances = 2"}}, keys[1]).start()


X = np.random.default_rng(11).standard_normal((5, 4)).astype(np.float32)


def test_two_instances_each_serve_exactly_and_restart_alone(two):
    pythons = wait_for(lambda: all_ready(two, 2), what="two instances")
    load = [e for e in two.audit_events() if e["event"] == "model_load" and e["verdict"] == "ready"]
    assert len(load) == 1 and load[0]["instances"] == 2 and load[0]["path"] == "spawn"
    assert {"verify_s", "spawn_s", "ready_s", "worker_load_s"} <= set(load[0])
    assert sorted(load[0]["worker_pids"]) == sorted({load[0]["worker_pids"][0], load[0]["worker_pids"][1]})
    verifications = [e for e in two.audit_events() if e["event"] == "model_verify"]
    assert len(verifications) == 1   # verified once, two workers on the same sealed copies

    # Calls are spread: each worker's CPU time grows (ties go round-robin).
    before = [p.cpu_times() for p in pythons]
    with two.client() as client:
        for _ in range(300):
            np.testing.assert_allclose(client.infer("demo", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
    spent = [sum(p.cpu_times()[:2]) - sum(b[:2]) for p, b in zip(pythons, before)]
    assert min(spent) > 0.2 * max(spent), spent

    # Kill one: the other answers exactly, the model stays READY, the dead one comes back alone.
    victim, survivor = pythons
    for _ in range(2):   # then the one that survived: both instances die and come back once
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: reason(two)[1].startswith("1/2 instances ready; instance "), what="one instance down")
        assert reason(two)[0] == "READY"
        with two.client() as client:
            for _ in range(5):
                np.testing.assert_allclose(client.infer("demo", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
        back = wait_for(lambda: all_ready(two, 2), what="the killed instance restarted")
        assert survivor.pid in [p.pid for p in back] and victim.pid not in [p.pid for p in back]
        victim, survivor = survivor, next(p for p in back if p.pid != survivor.pid)
    died = [e for e in two.audit_events() if e["event"] == "worker_died"]
    assert len(died) == 2 and {e["instance"] for e in died} == {1, 2}
    assert all("SIGKILL" in e["reason"] for e in died)
    restarts = [e for e in two.audit_events() if e["event"] == "model_load" and e.get("restart")]
    assert len(restarts) == 2 and {e["instance"] for e in restarts} == {1, 2}


def test_instance_killed_mid_call_leaves_the_other_serving(two):
    pythons = wait_for(lambda: all_ready(two, 2), what="two instances")
    stop = threading.Event()
    ok, failed, states = [0], [], set()

    def call():
        with two.client() as client:
            while not stop.is_set():
                try:
                    np.testing.assert_allclose(client.infer("demo", {"x": X})["y"], reference(X),
                                               rtol=1e-5, atol=1e-5)
                    ok[0] += 1
                except grpc.RpcError as exc:
                    failed.append((exc.code(), exc.details()))

    threads = [threading.Thread(target=call, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: ok[0] > 50, what="calls flowing")
    os.kill(pythons[0].pid, signal.SIGKILL)
    at_kill = ok[0]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        states.add(reason(two)[0])
        time.sleep(0.05)
    back = wait_for(lambda: all_ready(two, 2), what="the killed instance restarted")
    after_restart = ok[0]
    wait_for(lambda: ok[0] > after_restart + 50, what="calls after the restart")
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert states == {"READY"}
    assert ok[0] > at_kill + 50
    # Only calls that were at the killed instance fail, with sealbox's own UNAVAILABLE text.
    assert len(failed) <= 4, failed
    assert all(code == grpc.StatusCode.UNAVAILABLE and details.startswith("model 'demo' is unavailable: ")
               for code, details in failed), failed
    assert pythons[0].pid not in [p.pid for p in back] and pythons[1].pid in [p.pid for p in back]


def test_unload_stops_all_and_hand_over_replaces_all(two):
    first = wait_for(lambda: all_ready(two, 2), what="two instances")
    with two.client() as client:
        client.load("demo")   # a loaded model: verified again and handed over
        second = wait_for(lambda: all_ready(two, 2), what="two new instances")
        assert not {p.pid for p in first} & {p.pid for p in second}
        wait_for(lambda: not any(p.is_running() for p in first), what="the old instances drained")
        np.testing.assert_allclose(client.infer("demo", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
        client.unload("demo")
        assert reason(two) == ("UNLOADED", "unloaded")
        wait_for(lambda: not instance_pythons(two) and not any(p.is_running() for p in second),
                 what="every instance stopped")
        with pytest.raises(grpc.RpcError) as refused:
            client.infer("demo", {"x": X})
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    drained = [e for e in two.audit_events() if e["event"] == "worker_drained"]
    assert sorted(e["worker_pid"] for e in drained) == sorted(
        next(e for e in two.audit_events() if e["event"] == "model_load")["worker_pids"])
