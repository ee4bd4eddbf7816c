"""Prometheus metrics for sealboxd (prometheus_client), off unless `[server] metrics` is set.

One `Metrics` object owns its own CollectorRegistry (no module-level state: two
daemons, or a test and a daemon, in one process never share counters). The
rest of the daemon calls its methods; `serve()` exposes the registry in the
Prometheus text format on a loopback TCP address (Triton's convention is
port 8002) or a Unix socket:

    [server]
    metrics = "127.0.0.1:8002"           # or "[::1]:8002", or "unix:/run/sealbox/metrics.sock"

| metric | labels | what |
|---|---|---|
| sealbox_requests_total | model, version, code | inference requests by gRPC status code (failures: code != "OK") |
| sealbox_request_duration_seconds | model, version, phase | histogram; phase = queue (waiting for the worker), compute (in the worker), total |
| sealbox_requests_in_flight | model | requests being served now |
| sealbox_worker_deaths_total | model, version, reason | unexpected worker exits; reason = oom, seccomp, pids_limit, signal, exit, other |
| sealbox_worker_restarts_total | model, version | restarts after a death (backoff) |
| sealbox_model_load_duration_seconds | model, version | histogram: worker launch to READY (parse and warm-up in the sandbox) |
| sealbox_verifications_total | model, check, verdict | verification outcomes; check = the failed check on refusal, "all" when accepted |
| sealbox_model_state | model, state | 1 for the model's current state (UNLOADED, LOADING, READY, UNAVAILABLE), else 0 |
| sealbox_worker_memory_bytes | model, version | the model's workers' memory use, from their cgroups, summed over instances (memory.current / memory.usage_in_bytes) |
| sealbox_worker_memory_limit_bytes | model, version | the worker's memory limit |
| process_resident_memory_bytes, process_* | | the daemon itself (prometheus_client's ProcessCollector, from /proc/self) |

The request metrics are fed by the front door (server.py) for every ModelInfer call and every
message of a ModelStreamInfer stream addressed to a configured model (a request for an unknown
model or one that cannot be parsed is counted nowhere: its name is the caller's choice, and
labels must stay bounded). The same observations feed `statistics()`, which the gRPC
ModelStatistics RPC answers from in Triton's shape (`RequestStats`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import ipaddress
import os
import socketserver
import threading
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler, start_http_server
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STATES = ("UNLOADED", "LOADING", "READY", "UNAVAILABLE")
DEATH_KINDS = ("oom", "seccomp", "pids_limit", "signal", "exit", "other")


class ListenError(ValueError):
    """A metrics listen address that is not loopback TCP or a Unix socket path."""


def parse_listen(value: str) -> tuple[str, str, int] | tuple[str, str]:
    """("tcp", host, port) for a loopback IP literal with a port, ("unix", path) for unix:/abs/path."""
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not os.path.isabs(path):
            raise ListenError(f"a metrics Unix socket must be an absolute path, not {path!r}")
        return ("unix", path)
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ListenError(f"metrics must be 'IP:PORT' with an IP literal (or unix:/path), not {value!r}") from None
    if not address.is_loopback:
        raise ListenError(f"metrics must listen on a loopback address (there is no TLS), not {host}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ListenError(f"metrics port must be 1-65535, not {port!r}")
    return ("tcp", str(address), int(port))


def death_kind(reason: str) -> str:
    """Reduce a worker death reason (worker_process.death_reason) to one label value."""
    text = reason.lower()
    if "oom killer" in text:
        return "oom"
    if "seccomp" in text:
        return "seccomp"
    if "process limit" in text:
        return "pids_limit"
    if "killed by sig" in text or "killed by signal" in text:
        return "signal"
    if "exited with code" in text:
        return "exit"
    return "other"


def _code_name(code) -> str:
    """grpc.StatusCode.NOT_FOUND, 'NOT_FOUND' or None (OK) -> 'NOT_FOUND'."""
    if code is None:
        return "OK"
    return getattr(code, "name", str(code)).upper()


@dataclasses.dataclass
class Duration:
    """Triton's StatisticDuration: how many, and their cumulative nanoseconds."""
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(max(0.0, seconds) * 1e9)


@dataclasses.dataclass
class RequestStats:
    """One model version's request statistics in Triton's terms (ModelStatistics). Like Triton,
    `queue` and `compute_infer` are summed over successful requests only; `fail` counts every
    failed request with its total time. Without batching (max_batch_size 0) each request is one
    inference and one execution. The worker hop is one step (request bytes in, response bytes
    out), so all of a request's time at the worker is compute_infer."""
    success: Duration = dataclasses.field(default_factory=Duration)
    fail: Duration = dataclasses.field(default_factory=Duration)
    queue: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    last_inference_ms: int = 0     # milliseconds since the epoch of the last successful request
    # With dynamic batching: rows per engine call -> (executions, their engine time), as the worker reports.
    batches: dict = dataclasses.field(default_factory=dict)


class _ModelCollector(Collector):
    """Collected at scrape time: each model's state and each live worker's memory, from its cgroup."""

    def __init__(self, states: Callable[[], Iterable[tuple[str, str]]],
                 workers: Callable[[], Iterable[tuple[str, str, object]]]):
        self._states, self._workers = states, workers

    def collect(self):
        state = GaugeMetricFamily("sealbox_model_state", "1 for the model's current state, else 0",
                                  labels=["model", "state"])
        for model, current in self._states():
            for s in STATES:
                state.add_metric([model, s], 1.0 if s == current else 0.0)
        yield state
        used = GaugeMetricFamily("sealbox_worker_memory_bytes",
                                 "the model's workers' memory use, from their cgroups (summed over instances)",
                                 labels=["model", "version"])
        limit = GaugeMetricFamily("sealbox_worker_memory_limit_bytes", "the model's workers' memory limits (summed over instances)",
                                  labels=["model", "version"])
        totals: dict[tuple[str, str], list] = {}   # a model's instances add up (one cgroup each)
        for model, version, cgroup in self._workers():
            try:
                current, maximum = cgroup.memory_usage(), cgroup.memory_limit()
            except OSError:  # the worker went away between listing and reading
                continue
            sums = totals.setdefault((model, version), [None, None])
            for i, value in enumerate((current, maximum)):
                if value is not None:
                    sums[i] = (sums[i] or 0) + value
        for labels, (current, maximum) in totals.items():
            if current is not None:
                used.add_metric(list(labels), float(current))
            if maximum is not None:
                limit.add_metric(list(labels), float(maximum))
        yield used
        yield limit


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("sealbox_requests", "inference requests by gRPC status code",
                                ["model", "version", "code"], registry=r)
        self.latency = Histogram("sealbox_request_duration_seconds", "inference latency by phase",
                                 ["model", "version", "phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("sealbox_requests_in_flight", "inference requests being served",
                               ["model"], registry=r)
        self.deaths = Counter("sealbox_worker_deaths", "unexpected worker exits by reason",
                              ["model", "version", "reason"], registry=r)
        self.restarts = Counter("sealbox_worker_restarts", "worker restarts after a death",
                                ["model", "version"], registry=r)
        self.load_seconds = Histogram("sealbox_model_load_duration_seconds", "worker launch to READY",
                                      ["model", "version"], buckets=LOAD_BUCKETS, registry=r)
        self.verifications = Counter("sealbox_verifications", "verification outcomes",
                                     ["model", "check", "verdict"], registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co. for the daemon, from /proc/self
        self._model_collector: _ModelCollector | None = None
        self._stats: dict[tuple[str, str], RequestStats] = {}
        self._stats_lock = threading.Lock()
        # The labelled children every request updates, looked up once per label set, not per call
        # (prometheus_client's labels() builds and locks each time: ~40 % of a request's metrics cost).
        # Labels are bounded (configured models, gRPC codes), and none is ever removed.
        self._children: dict[tuple, object] = {}

    # -- what the daemon calls
    def observe_request(self, model: str, version: str, code, queue_s: float | None,
                        compute_s: float | None, total_s: float) -> None:
        code_name = _code_name(code)
        version = version or ""
        self._child(self.requests, model, version, code_name).inc()
        for phase, seconds in (("queue", queue_s), ("compute", compute_s), ("total", total_s)):
            if seconds is not None:
                self._child(self.latency, model, version, phase).observe(max(0.0, seconds))
        with self._stats_lock:
            stats = self._stats.setdefault((model, version), RequestStats())
            if code_name != "OK":
                stats.fail.add(total_s)
                return
            stats.success.add(total_s)
            stats.queue.add(queue_s or 0.0)
            stats.compute_infer.add(compute_s or 0.0)
            stats.last_inference_ms = int(time.time() * 1000)

    def observe_execution(self, model: str, version: str, rows: int, ns: int, longest_ns: int) -> None:
        """One engine call of a batching worker: `rows` rows (one or more requests) in `ns` ns, as the
        worker says; counted as at most `longest_ns` (the inference timeout: a longer call is killed)."""
        with self._stats_lock:
            stats = self._stats.setdefault((model, version or ""), RequestStats())
            duration = stats.batches.setdefault(rows, Duration())
            duration.count += 1
            duration.ns += min(max(0, ns), longest_ns)

    def statistics(self) -> dict[tuple[str, str], RequestStats]:
        """A copy of every (model, version)'s RequestStats so far."""
        with self._stats_lock:
            return copy.deepcopy(self._stats)

    def _child(self, metric, *labels):
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:   # (a race between threads makes the same child twice: harmless)
            child = self._children[key] = metric.labels(*labels)
        return child

    @contextlib.contextmanager
    def inflight(self, model: str):
        gauge = self._child(self.in_flight, model)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def worker_death(self, model: str, reason_kind: str, version: str = "") -> None:
        kind = reason_kind if reason_kind in DEATH_KINDS else death_kind(reason_kind)
        self.deaths.labels(model, version or "", kind).inc()

    def worker_restart(self, model: str, version: str = "") -> None:
        self.restarts.labels(model, version or "").inc()

    def load_duration(self, model: str, seconds: float, version: str = "") -> None:
        self.load_seconds.labels(model, version or "").observe(seconds)

    def verification(self, model: str, check: str, verdict: str) -> None:
        self.verifications.labels(model, check, verdict).inc()

    def watch(self, states: Callable[[], Iterable[tuple[str, str]]],
              workers: Callable[[], Iterable[tuple[str, str, object]]]) -> None:
        """Report model states and worker memory at scrape time (callables return fresh lists)."""
        if self._model_collector is not None:
            self.registry.unregister(self._model_collector)
        self._model_collector = _ModelCollector(states, workers)
        self.registry.register(self._model_collector)

    def watch_supervisor(self, supervisor) -> None:
        self.watch(lambda: [(n, supervisor.status(n).state.value) for n in supervisor.names()],
                   supervisor.worker_cgroups)

    # -- exposition
    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, listen: str, socket_mode: int = 0o660) -> "MetricsServer":
        where = parse_listen(listen)
        if where[0] == "tcp":
            httpd, thread = start_http_server(where[2], addr=where[1], registry=self.registry)
            return MetricsServer(httpd, thread, f"http://{listen}/metrics")
        path = where[1]
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            httpd = _UnixHTTPServer(path, MetricsHandler.factory(self.registry))
        finally:
            os.umask(old)
        os.chmod(path, socket_mode)
        thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
        thread.start()
        return MetricsServer(httpd, thread, f"unix:{path}", path)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port) pair


class MetricsServer:
    def __init__(self, httpd, thread, address: str, unix_path: str | None = None):
        self.httpd, self.thread, self.address, self._unix_path = httpd, thread, address, unix_path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
