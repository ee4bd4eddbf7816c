"""Operations, without a daemon: metrics API and exposition, sd_notify, log formats, audit log, config."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import threading
import urllib.request

import pytest

from sealbox.daemon import logs
from sealbox.daemon.audit import AuditLog
from sealbox.daemon.config import ConfigError, load_config
from sealbox.daemon.metrics import ListenError, Metrics, death_kind, parse_listen
from sealbox.daemon.notify import Notifier

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def sample(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- metrics

def test_metrics_api_counts_requests_latency_and_inflight():
    m = Metrics()
    m.observe_request("mnist", "3", None, 0.001, 0.01, 0.012)
    m.observe_request("mnist", "3", "NOT_FOUND", None, None, 0.0005)
    import grpc
    m.observe_request("mnist", "3", grpc.StatusCode.UNAVAILABLE, 0.0, 0.2, 0.2)
    assert sample(m, "sealbox_requests_total", model="mnist", version="3", code="OK") == 1
    assert sample(m, "sealbox_requests_total", model="mnist", version="3", code="NOT_FOUND") == 1
    assert sample(m, "sealbox_requests_total", model="mnist", version="3", code="UNAVAILABLE") == 1
    assert sample(m, "sealbox_request_duration_seconds_count", model="mnist", version="3", phase="total") == 3
    assert sample(m, "sealbox_request_duration_seconds_count", model="mnist", version="3", phase="compute") == 2
    with m.inflight("mnist"):
        assert sample(m, "sealbox_requests_in_flight", model="mnist") == 1
    assert sample(m, "sealbox_requests_in_flight", model="mnist") == 0


def test_metrics_lifecycle_counters_and_independent_registries():
    m, other = Metrics(), Metrics()
    m.worker_death("a", "oom", "1")
    m.worker_death("a", "worker killed by SIGKILL while serving", "1")  # a raw reason is classified
    m.worker_restart("a", "1")
    m.load_duration("a", 0.7, "1")
    m.verification("a", "digest", "refused")
    m.verification("a", "all", "accepted")
    assert sample(m, "sealbox_worker_deaths_total", model="a", version="1", reason="oom") == 1
    assert sample(m, "sealbox_worker_deaths_total", model="a", version="1", reason="signal") == 1
    assert sample(m, "sealbox_worker_restarts_total", model="a", version="1") == 1
    assert sample(m, "sealbox_model_load_duration_seconds_sum", model="a", version="1") == pytest.approx(0.7)
    assert sample(m, "sealbox_verifications_total", model="a", check="digest", verdict="refused") == 1
    assert sample(other, "sealbox_worker_restarts_total", model="a", version="1") is None  # no global state
    text = m.exposition().decode()
    assert "process_resident_memory_bytes" in text  # the daemon's own RSS


def test_model_state_and_worker_memory_collected_at_scrape_time():
    class FakeCgroup:
        def memory_usage(self):
            return 12345

        def memory_limit(self):
            return 2**20
    m = Metrics()
    states = {"a": "READY", "b": "UNAVAILABLE"}
    m.watch(lambda: list(states.items()), lambda: [("a", "2", FakeCgroup())])
    assert sample(m, "sealbox_model_state", model="a", state="READY") == 1
    assert sample(m, "sealbox_model_state", model="b", state="READY") == 0
    assert sample(m, "sealbox_model_state", model="b", state="UNAVAILABLE") == 1
    assert sample(m, "sealbox_worker_memory_bytes", model="a", version="2") == 12345
    assert sample(m, "sealbox_worker_memory_limit_bytes", model="a", version="2") == 2**20
    states["b"] = "READY"
    assert sample(m, "sealbox_model_state", model="b", state="READY") == 1


@pytest.mark.parametrize("reason,kind", [
    ("worker killed by the OOM killer while serving (memory limit 512 MiB)", "oom"),
    ("worker killed by SIGSYS (seccomp violation) while loading", "seccomp"),
    ("worker exited with code 1 while loading (process limit 64 reached)", "pids_limit"),
    ("worker killed by SIGKILL while serving", "signal"),
    ("worker exited with code 3 (model refused) while loading", "exit"),
    ("something new", "other"),
])
def test_death_kinds(reason, kind):
    assert death_kind(reason) == kind


@pytest.mark.parametrize("value,parsed", [
    ("127.0.0.1:8002", ("tcp", "127.0.0.1", 8002)),
    ("[::1]:8002", ("tcp", "::1", 8002)),
    ("unix:/run/sealbox/metrics.sock", ("unix", "/run/sealbox/metrics.sock")),
])
def test_parse_listen_accepts(value, parsed):
    assert parse_listen(value) == parsed


@pytest.mark.parametrize("value", ["0.0.0.0:8002", "10.0.0.1:8002", "localhost:8002", "127.0.0.1",
                                   "127.0.0.1:0", "127.0.0.1:99999", "unix:relative.sock"])
def test_parse_listen_refuses(value):
    with pytest.raises(ListenError):
        parse_listen(value)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_served_over_loopback_http_and_unix_socket(tmp_path):
    m = Metrics()
    m.worker_restart("x")
    port = free_port()
    server = m.serve(f"127.0.0.1:{port}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.status == 200 and "text/plain" in r.headers["Content-Type"]
            assert 'sealbox_worker_restarts_total{model="x",version=""} 1.0' in r.read().decode()
    finally:
        server.close()
    path = str(tmp_path / "metrics.sock")
    server = m.serve(f"unix:{path}", socket_mode=0o600)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        import http.client

        class UnixHTTPConnection(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(10)
                self.sock.connect(path)
        conn = UnixHTTPConnection("localhost")
        conn.request("GET", "/metrics")
        answer = conn.getresponse()
        assert answer.status == 200 and b"sealbox_worker_restarts_total" in answer.read()
        conn.close()
    finally:
        server.close()
    assert not os.path.exists(path)


# -- sd_notify

def datagram_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_path_and_abstract_sockets(tmp_path):
    path = str(tmp_path / "notify")
    with datagram_socket(path) as sock:
        n = Notifier(path)
        assert n.ready("serving") and sock.recv(4096) == b"READY=1\nSTATUS=serving"
        assert n.stopping() and sock.recv(4096).startswith(b"STOPPING=1")
        assert n.reloading() and re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", sock.recv(4096))
    name = f"sealbox-test-{os.getpid()}"
    with datagram_socket("\0" + name) as sock:
        assert Notifier("@" + name).send("WATCHDOG=1") and sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_socket_is_a_no_op_and_environment_is_cleared():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "1"}
    n = Notifier.from_environ(env)
    assert n.address == "@x" and n.watchdog_interval() == 2.0 and env == {"OTHER": "1"}
    assert Notifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_usec is None
    assert not Notifier(None).ready()


def test_watchdog_pings_only_while_healthy(tmp_path):
    path = str(tmp_path / "notify")
    with datagram_socket(path) as sock:
        n = Notifier(path, watchdog_usec=100_000)  # ping every 50 ms
        healthy, stop = threading.Event(), threading.Event()
        healthy.set()
        thread = n.start_watchdog(stop, healthy.is_set)
        assert sock.recv(4096) == b"WATCHDOG=1"
        healthy.clear()
        sock.settimeout(0.5)
        while True:  # drain pings already in flight, then silence
            try:
                sock.recv(4096)
            except socket.timeout:
                break
        stop.set()
        thread.join(5)


# -- operational logs

def test_text_log_lines_have_iso_timestamps_and_levels():
    stream = io.StringIO()
    logger = logging.getLogger("sealbox-test-text")
    logger.propagate = False
    logs.setup("text", logging.INFO, stream=stream, logger=logger)
    logger.warning("model %s not loaded", "x")
    line = stream.getvalue().strip()
    stamp, level, rest = line.split(" ", 2)
    assert ISO_MS.match(stamp) and level == "WARNING" and rest == "sealbox-test-text: model x not loaded"


def test_json_log_lines(tmp_path):
    stream = io.StringIO()
    logger = logging.getLogger("sealbox-test-json")
    logger.propagate = False
    logs.setup("json", logging.INFO, stream=stream, logger=logger, file=str(tmp_path / "op.log"))
    logger.info("listening on %s", "unix:/x", extra={"model": "m"})
    record = json.loads(stream.getvalue())
    assert ISO_MS.match(record["time"]) and record["level"] == "INFO" and record["logger"] == "sealbox-test-json"
    assert record["message"] == "listening on unix:/x" and record["model"] == "m"
    os.rename(tmp_path / "op.log", tmp_path / "op.log.1")
    assert logs.reopen(logger) == 1
    logger.info("after rotation")
    assert json.loads((tmp_path / "op.log").read_text())["message"] == "after rotation"
    assert "after rotation" not in (tmp_path / "op.log.1").read_text()
    with pytest.raises(ValueError):
        logs.formatter("xml")


# -- audit log

def test_audit_millisecond_timestamps_one_naming_style_and_reopen(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    audit.event("model.verify", model="m", verdict="accepted")
    audit.event("model_load", model="m")
    first = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["event"] for r in first] == ["model_verify", "model_load"]
    assert all(ISO_MS.match(r["time"]) for r in first)
    os.rename(path, tmp_path / "audit.jsonl.1")
    audit.event("before_reopen")  # still the old (renamed) file, as logrotate expects until SIGHUP
    audit.reopen()
    audit.event("after_reopen")
    audit.close()
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["after_reopen"]
    assert json.loads((tmp_path / "audit.jsonl.1").read_text().splitlines()[-1])["event"] == "before_reopen"
    assert oct(path.stat().st_mode & 0o777) == "0o640"


# -- config

def config_file(tmp_path, server: str) -> str:
    from tests.support.pki import make_ec_key
    _, public = make_ec_key(tmp_path)
    path = tmp_path / "sealboxd.toml"
    path.write_text(f"[server]\n{server}\n[policy]\nsources = [\"{tmp_path}\"]\npublic_keys = [\"{public}\"]\n")
    return str(path)


def test_config_metrics_key(tmp_path):
    cfg = load_config(config_file(tmp_path, 'metrics = "127.0.0.1:8002"'))
    assert cfg.server.metrics == "127.0.0.1:8002"
    assert load_config(config_file(tmp_path, "")).server.metrics is None  # off by default
    with pytest.raises(ConfigError, match=r"\[server\]: key 'metrics': .*loopback"):
        load_config(config_file(tmp_path, 'metrics = "0.0.0.0:8002"'))
    assert load_config(config_file(tmp_path, "")).server.audit_log == "/var/log/sealbox/audit.jsonl"
