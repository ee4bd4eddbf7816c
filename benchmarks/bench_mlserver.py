"""sealbox vs Seldon MLServer serving the same tiny MLP, both called with stock tritonclient over gRPC.

    python -m benchmarks.bench_mlserver      (from the repository root, as root; BENCH_CALLS=1000, BENCH_ROUNDS=7)

MLServer runs in a virtualenv of its own, made by this benchmark on first use
(`python3 -m venv /opt/sealbox/bench-mlserver && pip install mlserver numpy`;
SEALBOX_BENCH_MLSERVER_VENV moves it), with a custom runtime
(benchmarks/mlserver_runtime.py: MLServer has no MLX runtime) doing the demo
model's computation with numpy on the same weights, `parallel_workers = 0`
(inference in the server's own process, as sealbox's worker runs it). sealbox
serves the signed demo model (client -> supervisor -> sandboxed MLX worker).
Both listen on loopback TCP. In the same run: small-call (batch 1) p50/p99,
in interleaved blocks, and model load time: MLServer's repository load over
HTTP (POST /v2/repository/models/demo/load, into its running process)
against sealbox's load-to-READY of the tiny model (verify, spawn a sandboxed
worker, load, warm up) over the admin socket. If MLServer cannot be installed
or started, the benchmark says why and skips it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.common import DemoDaemon, p99

VENV = Path(os.environ.get("SEALBOX_BENCH_MLSERVER_VENV", "/opt/sealbox/bench-mlserver"))
CALLS = int(os.environ.get("BENCH_CALLS", "1000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
BLOCK = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlserver_venv() -> Path:
    """MLServer's own virtualenv (made once); SystemExit with the reason if it cannot be made."""
    mlserver = VENV / "bin" / "mlserver"
    if not mlserver.exists():
        print(f"making MLServer's virtualenv at {VENV} (pip install mlserver numpy) ...", flush=True)
        for argv in (["python3", "-m", "venv", str(VENV)], [str(VENV / "bin" / "pip"), "install", "-q", "mlserver", "numpy"]):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"MLServer skipped: {' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return mlserver


def start_mlserver(mlserver: Path, directory: Path, weights: dict) -> tuple[subprocess.Popen, str, str]:
    model = directory / "demo"
    model.mkdir(parents=True)
    np.savez(model / "weights.npz", **weights)
    shutil.copy(Path(__file__).with_name("mlserver_runtime.py"), directory / "mlserver_runtime.py")
    grpc_port, http_port = free_port(), free_port()
    (directory / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port, "metrics_port": free_port(),
        "parallel_workers": 0, "debug": False}))
    (model / "model-settings.json").write_text(json.dumps({
        "name": "demo", "implementation": "mlserver_runtime.DemoMLP", "parameters": {"uri": "./weights.npz"}}))
    log = open(directory / "mlserver.log", "wb")
    proc = subprocess.Popen([str(mlserver), "start", str(directory)], cwd=directory, stdout=log, stderr=subprocess.STDOUT)
    http = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"MLServer skipped: it exited {proc.returncode}: "
                             f"{(directory / 'mlserver.log').read_text()[-800:]}")
        try:
            with urllib.request.urlopen(f"{http}/v2/models/demo/ready", timeout=2) as answer:
                if answer.status == 200:
                    return proc, f"127.0.0.1:{grpc_port}", http
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"MLServer skipped: not ready after 120 s: {(directory / 'mlserver.log').read_text()[-800:]}")


def latencies(targets: dict[str, str]) -> dict[str, list[float]]:
    """Through stock tritonclient, in a process of its own (benchmarks/triton_caller.py)."""
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_caller.py")), str(CALLS), str(BLOCK),
                           *(f"{name}={url}" for name, url in targets.items())],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"triton_caller failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> int:
    from sealbox.client.demo_model import demo_weights
    try:
        mlserver = mlserver_venv()
    except SystemExit as exc:
        print(exc)
        return 0
    tcp = f"127.0.0.1:{free_port()}"
    tmp = Path(tempfile.mkdtemp(prefix="sealbox-bench-mlserver-"))
    proc = None
    try:
        try:
            proc, ml_grpc, ml_http = start_mlserver(mlserver, tmp, demo_weights())
        except SystemExit as exc:
            print(exc)
            return 0
        with DemoDaemon(server=f'tcp = "{tcp}"') as daemon:
            samples = latencies({"sealbox": tcp, "MLServer": ml_grpc})
            sealbox_load, ml_load = [], []
            with daemon.daemon.admin_client() as admin:
                for _ in range(ROUNDS):
                    admin.unload("demo")
                    t = time.perf_counter()
                    admin.load("demo")
                    sealbox_load.append(time.perf_counter() - t)
                    post = lambda what: urllib.request.urlopen(urllib.request.Request(   # noqa: E731
                        f"{ml_http}/v2/repository/models/demo/{what}", data=b"", method="POST"), timeout=60).close()
                    post("unload")
                    t = time.perf_counter()
                    post("load")
                    ml_load.append(time.perf_counter() - t)
            phases = [e for e in daemon.daemon.audit_events() if e["event"] == "model_load"
                      and e.get("model") == "demo" and e.get("verdict") == "ready"][-ROUNDS:]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    s, m = samples["sealbox"], samples["MLServer"]
    print(f"tiny MLP (4-16-3), batch 1, stock tritonclient over loopback gRPC, {len(s)} calls each in "
          f"interleaved blocks of {BLOCK}")
    print(f"  sealbox  p50 {statistics.median(s) * 1e3:6.3f} ms  p99 {p99(s) * 1e3:6.3f} ms")
    print(f"  MLServer p50 {statistics.median(m) * 1e3:6.3f} ms  p99 {p99(m) * 1e3:6.3f} ms  (parallel_workers 0)")
    print(f"  ratio sealbox / MLServer: p50 {statistics.median(s) / statistics.median(m):.2f}x, p99 {p99(s) / p99(m):.2f}x")
    sl, ml = statistics.median(sealbox_load), statistics.median(ml_load)
    print(f"model load, median of {ROUNDS}: sealbox load -> READY {sl * 1e3:7.1f} ms (verify "
          f"{statistics.median([e['verify_s'] for e in phases]) * 1e3:.1f} ms, spawn "
          f"{statistics.median([e['spawn_s'] for e in phases]) * 1e3:.1f} ms); MLServer repository load "
          f"{ml * 1e3:7.1f} ms; ratio {sl / ml:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
