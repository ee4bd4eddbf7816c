"""Triton's system shared-memory extension through a real sealboxd, driven by stock tritonclient."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import threading
import uuid

import numpy as np
import psutil
import pytest

from sealbox.daemon.shared_memory import MAX_FREE_ARENA_BYTES
from tests.support import PYTHON, REPO, wait_for
from tests.support.models import reference, worker_python

if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient[grpc] is not installed (a test dependency)", allow_module_level=True)


def probe(target: str, tag: str) -> dict:
    result = subprocess.run([PYTHON, str(REPO / "tests" / "daemon" / "triton_shm_probe.py"), target, "demo", tag],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def open_files(pid: int) -> list[str]:
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return targets


def arenas(pid: int) -> list[int]:
    """The sizes of the supervisor's shared-memory arenas (memfds, inputs and outputs)."""
    sizes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "sealbox-shm-" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                sizes.append(os.stat(f"/proc/{pid}/fd/{fd}").st_size)
        except OSError:
            pass
    return sizes


def test_tritonclient_shared_memory_in_and_out(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1], server="shared_memory_owners = [0]").start()
    tag = uuid.uuid4().hex[:8]
    out = probe(daemon.target, tag)
    assert out["status"] == [f"in-{tag}", f"out-{tag}"]
    x = np.array(out["x"], np.float32)
    np.testing.assert_allclose(np.array(out["y"]), reference(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(out["y_raw"]), reference(x), rtol=1e-5, atol=1e-5)
    small = np.array(out["x_small"], np.float32)   # through the arena the larger input used before
    np.testing.assert_allclose(np.array(out["y_small"]), reference(small), rtol=1e-5, atol=1e-5)
    assert out["shape_past_its_bytes"] == ["StatusCode.INVALID_ARGUMENT", "input "
                                           "'x': 32 bytes of shared-memory contents, shape [5, 4] of FP32 needs 80"]
    assert out["unregistered"] == ["StatusCode.INVALID_ARGUMENT",
                                   "shared memory: no region 'no-such-region' is registered"]
    assert out["past_the_region"] == ["StatusCode.INVALID_ARGUMENT", f"shared memory: input 'x': bytes [4112, 4192) "
                                      f"are outside region 'in-{tag}' of 4176 bytes"]
    assert out["output_too_small"] == ["StatusCode.INVALID_ARGUMENT", "shared memory: output 'y': 60 bytes do not fit "
                                       f"the 8 bytes given in region 'out-{tag}'"]
    assert out["output_past_the_region"] == ["StatusCode.INVALID_ARGUMENT", "shared memory: output 'y': bytes "
                                             f"[8184, 8244) are outside region 'out-{tag}' of 8192 bytes"]
    assert out["twice"] == ["StatusCode.ALREADY_EXISTS", f"shared memory: region 'in-{tag}' is already registered"]
    assert out["missing_object"] == ["StatusCode.INVALID_ARGUMENT",
                                     f"shared memory: cannot open shared-memory object 'sealbox-{tag}-missing'"]
    assert out["foreign_owner"] == ["StatusCode.PERMISSION_DENIED", f"shared memory: 'sealbox-{tag}-in' is owned by "
                                    "a user this listener does not accept regions from"]
    assert out["status_after_unregister"] == [f"out-{tag}"]
    assert out["after_unregister"] == ["StatusCode.INVALID_ARGUMENT", f"shared memory: no region 'in-{tag}' is registered"]
    assert out["status_after_unregister_all"] == []
    # Nothing of the client's left open in the supervisor, and the worker never held a descriptor of a
    # client's region at all. The worker's arenas stay for its next calls (bounded), and go with it.
    assert not [t for t in open_files(daemon.proc.pid) if f"sealbox-{tag}" in t]
    assert not [t for t in open_files(worker_python(daemon).pid) if t.startswith("/dev/shm")]
    assert 0 < sum(arenas(daemon.proc.pid)) <= 2 * MAX_FREE_ARENA_BYTES   # one set for inputs, one for outputs
    events = daemon.audit_events()
    assert [e["region"] for e in events if e["event"] == "shm_register"] == [f"in-{tag}", f"out-{tag}"]
    with daemon.admin_client() as client:
        client.unload("demo")
    assert arenas(daemon.proc.pid) == []


def test_a_worker_killed_during_a_shared_memory_call_leaves_nothing_open(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1], server="shared_memory_owners = [0]").start()
    worker = worker_python(daemon)
    tag = uuid.uuid4().hex[:8]
    os.kill(worker.pid, signal.SIGSTOP)   # the call reaches the worker and waits there
    proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "daemon" / "triton_shm_probe.py"), daemon.target, "demo",
                             tag, "killed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any("sealbox-shm-input" in t for t in open_files(daemon.proc.pid)), 60,
             "the input's arena to be made")
    worker.kill()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    code, message = json.loads(stdout)["killed"]
    assert code == "StatusCode.UNAVAILABLE" and message.startswith("model 'demo' is unavailable: worker killed by SIGKILL")
    assert not [t for t in open_files(daemon.proc.pid) if f"sealbox-{tag}" in t or "sealbox-shm-" in t]


def test_a_listener_without_owners_refuses_registration(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1]).start()
    script = ("import sys, tritonclient.grpc as tc\n"
              "from tritonclient.utils import InferenceServerException\n"
              "c = tc.InferenceServerClient(url=sys.argv[1])\n"
              "try:\n    c.register_system_shared_memory('r', '/dev-shm-unused', 16)\n"
              "except InferenceServerException as e:\n    print(e.status(), e.message())\n")
    result = subprocess.run([PYTHON, "-c", script, daemon.target], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == ("StatusCode.PERMISSION_DENIED shared memory: this listener accepts no "
                                     "shared-memory regions (its configuration lists no shared_memory_owners)")
    assert psutil.pid_exists(daemon.proc.pid)


WIDE = 16   # inputs and outputs: hop.MAX_SHM_FDS, the most one call may name


def wide_model(directory):
    """x0..x15 FP32 [-1, 4] -> y0..y15 = x_i * (i + 1): a call with 32 shared-memory tensors."""
    import mlx.core as mx
    os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
    directory.mkdir()
    mx.export_function(str(directory / "model.mlxfn"), lambda *xs: [x * (i + 1) for i, x in enumerate(xs)],
                       *[mx.zeros((2, 4))] * WIDE, shapeless=True)
    (directory / "model.json").write_text(json.dumps({
        "function": "model.mlxfn",
        "inputs": [{"name": f"x{i}", "datatype": "FP32", "shape": [-1, 4]} for i in range(WIDE)],
        "outputs": [{"name": f"y{i}", "datatype": "FP32", "shape": [-1, 4]} for i in range(WIDE)]}))
    return directory


def test_pipelined_calls_naming_many_shared_memory_tensors_never_exhaust_the_workers_descriptors(
        tmp_path, daemon_factory, keys):
    """12 calls at the worker at once, each with 16 inputs and 16 outputs in shared memory, hold ~32
    descriptors each in the worker (its input mappings and output arenas): 384, where its RLIMIT_NOFILE is
    256. Its reader takes a further call only while the calls it holds leave room (worker/serving.py), so
    every answer is exact and the worker is never replaced."""
    import grpc

    from sealbox.proto import inference_pb2 as pb
    from sealbox.proto import inference_pb2_grpc
    from tests.support.pki import upstream_sign

    model = wide_model(tmp_path / "wide")
    upstream_sign(model, keys[0])
    clients, rounds, rows = 12, 8, 2
    tensor = rows * 4 * 4
    daemon = daemon_factory({"wide": {"path": model}}, keys[1], server="shared_memory_owners = [0]",
                            extra="[server.limits]\ninference_rpcs = 32\nmodel_inflight = 12\nmodel_queue = 8\n"
                                  "per_caller_rpcs = 32\n").start()
    worker = worker_python(daemon)
    tag = uuid.uuid4().hex[:8]
    channel = grpc.insecure_channel(daemon.target)
    stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    paths = {}
    for c in range(clients):
        for side in ("in", "out"):
            name = f"{side}-{tag}-{c}"
            paths[name] = f"/dev/shm/sealbox-{name}"
            with open(paths[name], "wb") as f:
                f.truncate(WIDE * tensor)
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name=name, key=f"/sealbox-{name}", byte_size=WIDE * tensor), timeout=30)

    def shm(tensor_proto, region: str, i: int) -> None:
        tensor_proto.parameters["shared_memory_region"].string_param = region
        tensor_proto.parameters["shared_memory_byte_size"].int64_param = tensor
        tensor_proto.parameters["shared_memory_offset"].int64_param = i * tensor

    failures, sent = [], []

    def client(c: int) -> None:
        rng = np.random.default_rng(c)
        try:
            for r in range(rounds):
                xs = rng.standard_normal((WIDE, rows, 4)).astype(np.float32)
                with open(paths[f"in-{tag}-{c}"], "r+b") as f:
                    f.write(xs.tobytes())
                request = pb.ModelInferRequest(model_name="wide", id=f"{c}-{r}")
                for i in range(WIDE):
                    shm(request.inputs.add(name=f"x{i}", datatype="FP32", shape=[rows, 4]), f"in-{tag}-{c}", i)
                    shm(request.outputs.add(name=f"y{i}"), f"out-{tag}-{c}", i)
                response = stub.ModelInfer(request, timeout=120)
                assert [(o.name, list(o.shape)) for o in response.outputs] == [
                    (f"y{i}", [rows, 4]) for i in range(WIDE)]
                with open(paths[f"out-{tag}-{c}"], "rb") as f:
                    ys = np.frombuffer(f.read(), np.float32).reshape(WIDE, rows, 4)
                for i in range(WIDE):
                    np.testing.assert_array_equal(ys[i], xs[i] * (i + 1))
                sent.append(1)
        except Exception as exc:  # noqa: BLE001 - reported below, with the client's number
            failures.append(f"client {c}: {exc!r}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        channel.close()
        for path in paths.values():
            os.unlink(path)
    assert failures == []
    assert len(sent) == clients * rounds
    assert worker_python(daemon).pid == worker.pid and worker.is_running()
    assert not [e for e in daemon.audit_events() if e["event"] == "worker_died"]
