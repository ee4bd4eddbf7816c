"""Measure the worker's syscalls (the input to sandbox/seccomp.py's allowlists; see SECURITY.md).

Runs the real worker (`python -m sealbox.worker.main`) on the demo model and the echo model, without
bubblewrap, Landlock or seccomp, under `strace -f`, and drives it through the hop: Describe, small
and memfd-sized calls both ways, a streamed call, a cancelled call, a malformed record, SIGTERM.
Prints the distinct syscalls (with ioctl/fcntl/prctl/socket arguments) per engine.

    sudo /opt/sealbox/venv/bin/python -m benchmarks.syscalls
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import re
import signal
import subprocess
import tempfile
import time

import numpy as np


def drive(socket_path: str) -> None:
    from sealbox.daemon.worker_hop import WorkerHop, describe
    from sealbox.proto import hop, tensors

    deadline = time.monotonic() + 60
    while True:
        try:
            describe(socket_path, 2**16, 5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

    async def calls():
        channel = WorkerHop(socket_path, 2**28)
        for rows in (1, 2, 3, 5000, 2**20):   # inline and memfd-sized, both ways
            request = tensors.encode_request("m", {"x": np.ones((rows, 4), np.float32)})
            await channel.infer(request, 30)
        request = tensors.encode_request("m", {"x": np.ones((2, 4), np.float32)})
        async for _ in channel.stream(request, 30):
            pass
        await asyncio.gather(*(channel.infer(request, 30) for _ in range(4)))
        task = asyncio.ensure_future(channel.infer(tensors.encode_request("m", {"x": np.ones((2**20, 4), np.float32)}), 30))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        channel.close()
        sock = hop.connect(socket_path)   # a malformed record: the worker closes this connection
        sock.send(b"\xff" * 40)
        sock.recv(16)
        sock.close()
    asyncio.run(calls())


def measure(model_dir: str, engine: str, verified_files: dict) -> set[str]:
    from sealbox.sandbox import launcher
    from sealbox.sandbox.profile import SandboxProfile

    profile = SandboxProfile.for_model(engine, user="sealbox-worker", python=os.environ.get("WORKER_PYTHON", "python3"))
    spec = launcher.worker_spec(profile, verified_files)
    directory = tempfile.mkdtemp()
    socket_path = f"{directory}/worker.sock"
    spec = dataclasses.replace(spec, sandbox=dataclasses.replace(spec.sandbox, socket=socket_path, landlock=False,
                                                                 seccomp_stage2_fd=None))
    trace = f"{directory}/trace"
    proc = subprocess.Popen(["strace", "-f", "-qq", "-o", trace, profile.python, "-m", "sealbox.worker.main",
                             spec.to_json()], pass_fds=tuple(verified_files.values()),
                            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
                                 "MLX_DISABLE_COMPILE": "1"})
    try:
        drive(socket_path)
    finally:
        time.sleep(0.2)
        import psutil
        for child in psutil.Process(proc.pid).children():   # the worker, not strace
            child.send_signal(signal.SIGTERM)
        proc.wait(30)
    seen: collections.Counter = collections.Counter()
    for line in open(trace):
        m = re.match(r"\d+\s+(\w+)\((.*)", line)
        if not m:
            continue
        name, args = m.groups()
        if name in ("ioctl", "fcntl", "prctl", "socket"):
            first = args.split(", ")[0 if name in ("prctl", "socket") else 1].split(",")[0].rstrip(")")
            name = f"{name}({first})"
        seen[name] += 1
    return set(seen)


def main() -> None:
    from benchmarks.common import DemoDaemon
    from sealbox.trust import verify_model
    from sealbox.daemon.config import load_config

    demo = DemoDaemon()
    config = load_config(demo.config)
    os.environ["WORKER_PYTHON"] = config.workers.python
    results = {}
    for name in ("demo", "echo"):
        model = config.models[name]
        verified = verify_model(name, model.path, model.policy, None, None)
        results[name] = measure(model.path, model.format, verified.files)
        verified.close()
    union = set().union(*results.values())
    print(f"{len(union)} distinct syscalls (mlx: demo + echo models):")
    print(" ".join(sorted(union)))


if __name__ == "__main__":
    main()
