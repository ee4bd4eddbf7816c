"""The supervisor's resident memory with Prometheus metrics off and on, same calls, same run.

    python -m benchmarks.bench_ops        (from the repository root; ./dev.sh bench ops)

Each daemon serves the demo model; BENCH_OPS_CALLS small calls (default 500) go through it, and
with metrics on /metrics is scraped after every 50 calls; then the daemon's RSS is read from /proc.
"""
from __future__ import annotations

import os
import socket
import urllib.request

import numpy as np

from benchmarks.common import DemoDaemon

CALLS = int(os.environ.get("BENCH_OPS_CALLS", "500"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(metrics: bool) -> tuple[float, float]:
    port = free_port()
    server = f'metrics = "127.0.0.1:{port}"' if metrics else ""
    with DemoDaemon(server=server) as bench:
        pid = bench.daemon.proc.pid
        before = rss_mib(pid)
        x = np.ones((1, 4), np.float32)
        with bench.daemon.client() as client:
            for i in range(CALLS):
                client.infer("demo", {"x": x})
                if metrics and i % 50 == 49:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        return before, rss_mib(pid)


if __name__ == "__main__":
    off = run(False)
    on = run(True)
    print(f"daemon RSS after start / after {CALLS} calls: metrics off {off[0]:.0f} / {off[1]:.0f} MiB, "
          f"metrics on {on[0]:.0f} / {on[1]:.0f} MiB   ratio on/off {on[1] / off[1]:.2f}x")
