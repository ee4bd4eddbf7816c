"""Where a load's time goes (the model_load event's phase fields), and a daemon whose memory does
not grow with reloads: against a real sealboxd, real sandboxed workers and real signatures."""
from __future__ import annotations

import os
import re
import signal

import psutil
import pytest

from tests.support import wait_for
from tests.support.models import build_mlp_model
from tests.support.pki import upstream_sign

ROUNDING = 2e-4   # each field is rounded to 0.1 ms


def loads(daemon, model: str) -> list[dict]:
    return [e for e in daemon.audit_events() if e["event"] == "model_load" and e.get("model") == model
            and e.get("verdict") == "ready"]


def check_phases(event: dict, verified: bool) -> None:
    assert event["ready_s"] > 0 and event["spawn_s"] > 0
    if verified:
        assert 0 < event["hash_s"] <= event["verify_s"] + ROUNDING
        assert event["verify_s"] + event["spawn_s"] <= event["ready_s"] + ROUNDING
    else:   # a restart from the same sealed copies verifies nothing
        assert "verify_s" not in event and "hash_s" not in event
        assert event["spawn_s"] <= event["ready_s"] + ROUNDING
    assert event["ready_s"] < 120   # the load timeout is 60 s
    if "worker_read_s" in event:   # reading the weights is part of deserializing them
        assert event["worker_read_s"] <= event["worker_deserialize_s"] + ROUNDING
    for key, value in event.items():   # the worker's own numbers, where it reports them
        if key.startswith("worker_"):
            assert key in ("worker_pid", "worker_pids", "worker_deserialize_s", "worker_read_s", "worker_warmup_s",
                           "worker_load_s")
            if key == "worker_pids":   # every instance's pid (one instance here), the first one first
                assert value == [event["worker_pid"]]
            elif key != "worker_pid":
                assert 0 <= value <= event["spawn_s"] + ROUNDING


def test_a_load_audits_and_logs_where_its_time_went(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1]).start()
    try:
        first = wait_for(lambda: loads(daemon, "demo"), what="the initial load's audit event")[-1]
        check_phases(first, verified=True)
        verify = [e for e in daemon.audit_events() if e["event"] == "model_verify" and e["verdict"] == "accepted"]
        assert verify[-1]["hash_s"] == first["hash_s"]

        with daemon.admin_client() as client:   # a load of a serving model: a hand-over, timed the same way
            client.load("demo")
        handed_over = loads(daemon, "demo")[-1]
        assert handed_over is not first and handed_over["replaced"] == ""
        check_phases(handed_over, verified=True)

        os.kill(handed_over["worker_pid"], signal.SIGKILL)   # a restart: no verification, its own spawn
        restarted = wait_for(lambda: loads(daemon, "demo")[2:], what="the restart's audit event")[-1]
        check_phases(restarted, verified=False)

        # The audit event is written before the log line: wait for the restart's line, not just the event.
        restarted_line = rf"model demo ready in {restarted['ready_s']:.3f} s \(spawn {restarted['spawn_s']:.3f} s"
        wait_for(lambda: re.search(restarted_line, daemon.stderr_path.read_text()), what="the restart's log line")
        log = daemon.stderr_path.read_text()
        lines = re.findall(r"INFO sealboxd: model demo ready in ([0-9.]+) s \(verify ([0-9.]+) s, of which "
                           r"hashing ([0-9.]+) s; spawn ([0-9.]+) s", log)
        assert len(lines) == 2, log
        assert [float(x) for x in lines[0]] == pytest.approx(
            [first["ready_s"], first["verify_s"], first["hash_s"], first["spawn_s"]], abs=1e-3)
    finally:
        daemon.stop()


@pytest.mark.slow
def test_the_daemons_memory_does_not_grow_across_reloads(daemon_factory, keys, tmp_path):
    """Hashing buffers used to stay in glibc's per-thread arenas: 8 MiB per thread per load, the
    daemon's RSS rising by 130-230 MB after a few reloads. Now they are unmapped after each load."""
    path = tmp_path / "models" / "big"
    build_mlp_model(path, 192)
    upstream_sign(path, keys[0])
    daemon = daemon_factory({"big": {"path": path}}, keys[1], workers="memory_mb = 1024").start()
    try:
        proc = psutil.Process(daemon.proc.pid)
        with daemon.admin_client() as client:
            client.unload("big")
            client.load("big")
            baseline = proc.memory_info().rss
            for _ in range(5):
                client.unload("big")
                client.load("big")
            grown = proc.memory_info().rss - baseline
        print(f"daemon RSS after the second load {baseline / 2**20:.0f} MiB, after 5 more {grown / 2**20:+.1f} MiB")
        assert len(loads(daemon, "big")) == 7
        assert grown < 32 * 2**20
    finally:
        daemon.stop()
