"""Operations against a real sealboxd: sd_notify, SIGHUP log rotation, /metrics, log formats, non-root start."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request

import grpc
import psutil
import pytest

from tests.support import PYTHON, wait_for
from tests.support.daemon import Daemon

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class OpsDaemon(Daemon):
    """tests.support.daemon.Daemon with extra command-line arguments, environment and [server] keys."""

    def __init__(self, *args, server: str = "", argv=(), env=None, **kwargs):
        super().__init__(*args, **kwargs)
        if server:
            text = self.config.read_text().replace("[server]\n", f"[server]\n{server}\n", 1)
            self.config.write_text(text)
        self.argv, self.env = list(argv), env

    def start(self, wait: bool = True) -> "OpsDaemon":
        self.stderr = open(self.stderr_path, "wb")
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen([PYTHON, "-m", "sealbox.daemon.main", "--config", str(self.config), *self.argv],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr, cwd="/", env=env)
        if wait:
            self.wait_ready()
        return self


@pytest.fixture
def ops_daemon(tmp_path):
    daemons = []

    def make(models, public_key, **kwargs) -> OpsDaemon:
        directory = tmp_path / f"d{len(daemons)}"
        directory.mkdir()
        daemon = OpsDaemon(directory, models, public_key, **kwargs)
        daemons.append(daemon)
        return daemon
    yield make
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def tampered_model(demo_model, tmp_path):
    """A copy of the signed demo model with one byte more in its weights: refused at the digest check."""
    path = tmp_path / "models" / "tampered"
    shutil.copytree(demo_model, path)
    with open(path / "weights.safetensors", "ab") as f:
        f.write(b"\0")
    return path




def test_notify_ready_after_every_initial_load_has_an_outcome_then_stopping(ops_daemon, demo_model, tampered_model,
                                                                            keys, tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(120)
    daemon = ops_daemon({"demo": {"path": demo_model}, "tampered": {"path": tampered_model}}, keys[1],
                        env={"NOTIFY_SOCKET": notify_path})
    try:
        daemon.start(wait=False)
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1\n"), first
        # At READY every load = true model has its outcome: demo serving, tampered refused.
        events = daemon.audit_events()
        assert any(e["event"] == "model_load" and e["model"] == "demo" and e["verdict"] == "ready" for e in events)
        assert any(e["event"] == "model_verify" and e["model"] == "tampered" and e["verdict"] == "refused"
                   for e in events)
        assert "demo=READY" in first and "tampered=UNAVAILABLE" in first  # STATUS= line
        with daemon.client() as client:
            assert client.status("demo").state == "READY"
        daemon.proc.send_signal(signal.SIGTERM)
        second = sock.recv(4096).decode()
        assert second.startswith("STOPPING=1"), second
        assert daemon.proc.wait(timeout=60) == 0
    finally:
        sock.close()


def test_sighup_reopens_audit_log_and_log_file_and_keeps_serving(ops_daemon, demo_model, keys, tmp_path):
    log_file = tmp_path / "sealboxd.log"
    daemon = ops_daemon({"demo": {"path": demo_model}}, keys[1], argv=["--log-file", str(log_file)]).start()
    rotated_audit = daemon.audit_log.with_name("audit.jsonl.1")
    os.rename(daemon.audit_log, rotated_audit)
    os.rename(log_file, tmp_path / "sealboxd.log.1")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: log_file.exists() and "SIGHUP: reopened" in log_file.read_text(), what="the reopened log file")
    # ... and then reloads the config (unchanged here: no model touched), into the reopened audit log.
    wait_for(lambda: daemon.audit_log.exists() and "config_reload" in daemon.audit_log.read_text(),
             what="the config reload's audit event")
    assert daemon.proc.poll() is None  # SIGHUP no longer kills the daemon
    with daemon.client() as client:
        client.unload("demo")
        client.load("demo")
        assert client.status("demo").state == "READY"
    new = [json.loads(line) for line in daemon.audit_log.read_text().splitlines()]
    old = [json.loads(line) for line in rotated_audit.read_text().splitlines()]
    assert [e["event"] for e in new] == ["config_reload", "model_unload", "model_verify", "model_load"]
    assert new[0]["verdict"] == "accepted" and set(new[0]) == {"time", "event", "config", "verdict"}
    assert old[0]["event"] == "daemon_start" and not any(e["event"] == "model_unload" for e in old)
    assert all(ISO_MS.match(e["time"]) for e in new + old)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        return answer.read().decode()


def value(text: str, name: str, **labels) -> float | None:
    """The sample `name{labels...}` in a Prometheus text exposition (labels must all match)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        metric, _, number = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', metric))
        if metric.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
            return float(number)
    return None


def test_metrics_scraped_over_http_move_with_real_calls(ops_daemon, demo_model, tampered_model, keys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = ops_daemon({"demo": {"path": demo_model}, "tampered": {"path": tampered_model, "load": False}}, keys[1],
                        server=f'metrics = "127.0.0.1:{port}"').start()
    before = scrape(port)
    assert value(before, "sealbox_verifications_total", model="demo", check="all", verdict="accepted") == 1
    assert value(before, "sealbox_model_load_duration_seconds_count", model="demo") == 1
    assert value(before, "sealbox_model_state", model="demo", state="READY") == 1
    assert value(before, "sealbox_model_state", model="tampered", state="UNLOADED") == 1
    assert value(before, "sealbox_worker_memory_bytes", model="demo") > 0  # from the worker's cgroup
    assert value(before, "sealbox_worker_memory_limit_bytes", model="demo") == 2048 * 2**20
    assert value(before, "process_resident_memory_bytes") > 0

    with daemon.client() as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.load("tampered")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        client.unload("demo")
        client.load("demo")
    # A worker killed from outside: a death by signal, then a restart.
    workers = [psutil.Process(p) for p in daemon.worker_pids()]
    python = next(p for p in workers if "sealbox.worker.main" in " ".join(p.cmdline()))
    python.send_signal(signal.SIGKILL)

    def restarted():
        text = scrape(port)
        ready = value(text, "sealbox_model_state", model="demo", state="READY") == 1
        return text if ready and value(text, "sealbox_worker_restarts_total", model="demo") else None
    after = wait_for(restarted, what="the worker's restart in /metrics")
    assert value(after, "sealbox_verifications_total", model="demo", check="all", verdict="accepted") == 2
    assert value(after, "sealbox_verifications_total", model="tampered", check="digest", verdict="refused") == 1
    assert value(after, "sealbox_model_state", model="tampered", state="UNAVAILABLE") == 1
    assert value(after, "sealbox_worker_deaths_total", model="demo", reason="signal") == 1
    assert value(after, "sealbox_worker_restarts_total", model="demo") == 1
    assert value(after, "sealbox_model_load_duration_seconds_count", model="demo") == 3  # start, load, restart


def test_json_logs_on_stderr_and_audit_only_in_its_file(ops_daemon, demo_model, keys):
    daemon = ops_daemon({"demo": {"path": demo_model}}, keys[1], argv=["--log-format", "json"],
                        server="audit_stderr = true").start()
    assert daemon.stop() == 0
    lines = [line for line in daemon.stderr_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every operational line is one JSON object
    assert all(ISO_MS.match(r["time"]) and r["level"] in ("INFO", "WARNING", "ERROR") for r in records)
    assert any(r["message"].startswith("listening on") for r in records)
    assert any("audit_stderr is ignored" in r["message"] for r in records)
    assert not any("event" in r for r in records)  # no audit event on stderr
    events = daemon.audit_events()
    assert [e["event"] for e in events][0] == "daemon_start" and events[-1]["event"] == "daemon_stop"
    assert not any("level" in e for e in events)  # no operational line in the audit file


def test_text_log_lines_carry_iso_timestamps(ops_daemon, demo_model, keys):
    daemon = ops_daemon({"demo": {"path": demo_model}}, keys[1]).start()
    daemon.stop()
    for line in daemon.stderr_path.read_text().splitlines():
        stamp, level, rest = line.split(" ", 2)
        assert ISO_MS.match(stamp) and level in ("DEBUG", "INFO", "WARNING", "ERROR"), line


@pytest.mark.parametrize("user", ["sealbox-worker", "nobody"])
def test_non_root_start_is_one_line_and_exit_2(tmp_path, user):
    config = tmp_path / "sealboxd.toml"
    config.write_text("")
    result = subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user if user != 'nobody' else 'nogroup'}",
                             "--clear-groups", PYTHON, "-m", "sealbox.daemon.main", "--config", str(config)],
                            capture_output=True, text=True, cwd="/", timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sealboxd: must run as root"), result.stderr
    assert "Traceback" not in result.stderr


def test_watchdog_pings_after_ready_while_the_daemon_answers(ops_daemon, demo_model, keys, tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(120)
    daemon = ops_daemon({"demo": {"path": demo_model}}, keys[1],
                        env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000"})  # ping every 0.5 s
    try:
        daemon.start(wait=False)
        assert sock.recv(4096).startswith(b"READY=1")
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"WATCHDOG=1"
        # The workers never see the variables (read, then removed from the daemon's environment).
        for pid in daemon.worker_pids():
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            assert b"NOTIFY_SOCKET" not in environ and b"WATCHDOG_USEC" not in environ
    finally:
        daemon.stop()
        sock.close()
