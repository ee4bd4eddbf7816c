"""The whole chain, end to end: real sealboxd, real bubblewrap workers, real MLX, real gRPC."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import grpc
import numpy as np
import psutil
import pytest

from tests.support import PYTHON
from tests.support.pki import make_ec_key
from tests.support.models import reference, worker_python


@pytest.fixture
def served(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1], tcp=True).start()
    yield daemon


def test_infer_matches_in_process_mlx(served):
    x = np.random.default_rng(3).standard_normal((17, 4)).astype(np.float32)
    with served.client() as client:
        out = client.infer("demo", {"x": x})
        assert set(out) == {"y"}
        np.testing.assert_allclose(out["y"], reference(x), rtol=1e-5, atol=1e-5)
        meta = client.metadata("demo")
    assert meta.platform == "mlx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 3])]
    # Same answer over loopback TCP.
    from sealbox.client import Client
    with Client(served.tcp_target) as tcp_client:
        np.testing.assert_allclose(tcp_client.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5, atol=1e-5)


def test_health_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(served.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=10))
        services = {s.name for s in answers[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_public_socket_mode_and_no_takeover(served):
    import stat
    assert stat.S_IMODE(os.stat(served.socket).st_mode) == 0o660
    # A second daemon on the same socket refuses instead of taking it over.
    second = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(served.config)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert second.stderr.strip().endswith(f"sealboxd: {served.socket}: another daemon is listening there")
    with served.client() as client:
        assert client.model_ready("demo")


def test_async_client(served):
    import asyncio
    from sealbox.client import AsyncClient

    async def calls():
        async with AsyncClient(served.target) as client:
            x = np.random.default_rng(8).standard_normal((6, 4)).astype(np.float32)
            results = await asyncio.gather(*(client.infer("demo", {"x": x * k}) for k in range(4)))
            names = [m.name for m in await client.models()]
            return x, results, names, await client.model_ready("nope")
    x, results, names, unknown_ready = asyncio.run(calls())
    for k, out in enumerate(results):
        np.testing.assert_allclose(out["y"], reference(x * k), rtol=1e-5, atol=1e-5)
    assert names == ["demo"] and unknown_ready is False


def test_large_tensor_over_4mb(served):
    """A large unary response comes back through its call's response arena: the sandboxed worker wrote
    the output's raw bytes into the memfd the supervisor gave it, which is back in the supervisor's pool."""
    x = np.random.default_rng(4).standard_normal((300_000, 4)).astype(np.float32)  # 4.8 MB in, 3.6 MB out
    with served.client() as client:
        out = client.infer("demo", {"x": x})
    np.testing.assert_allclose(out["y"], reference(x), rtol=1e-4, atol=1e-4)
    arenas = {}   # by inode: the supervisor's mapping of an arena holds a second descriptor of it
    for fd in os.listdir(f"/proc/{served.proc.pid}/fd"):
        path = f"/proc/{served.proc.pid}/fd/{fd}"
        try:
            if "sealbox-shm-output" in os.readlink(path):
                with open(path, "rb") as f:
                    arenas[os.fstat(f.fileno()).st_ino] = f.read()
        except OSError:
            pass
    assert len(arenas) == 1
    [arena] = arenas.values()
    assert len(arena) >= x.nbytes and out["y"].astype(np.float32).tobytes() in arena


@pytest.mark.parametrize("inputs, code, message", [
    ({"x": np.zeros((2, 4), np.float64)}, grpc.StatusCode.INVALID_ARGUMENT, "input 'x': datatype FP64, expected FP32"),
    ({"x": np.zeros((2, 5), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT,
     "input 'x': shape [2, 5], expected [-1, 4] (-1 = any size)"),
    ({"z": np.zeros((2, 4), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "inputs ['z'], expected ['x']"),
])
def test_bad_inputs_are_invalid_argument(served, inputs, code, message):
    with served.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.infer("demo", inputs)
    assert err.value.code() == code
    assert err.value.details() == message


def test_malformed_requests_are_invalid_argument(served):
    from sealbox.proto import inference_pb2 as pb
    huge = pb.ModelInferRequest(model_name="demo")
    huge.inputs.add(name="x", datatype="FP32", shape=[2**32, 2**32])   # int64 product wraps to 0
    huge.raw_input_contents.append(b"")
    # Parses as far as the model name, then is garbage (a truncated field 5).
    garbage = pb.ModelInferRequest(model_name="demo").SerializeToString() + b"\x2a\x05\x0a\x01"
    with grpc.insecure_channel(served.target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            infer(huge.SerializeToString(), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == ("input 'x': shape [4294967296, 4294967296] of FP32 is larger than "
                                       "2147483648 bytes")
        with pytest.raises(grpc.RpcError) as err:
            infer(garbage, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("malformed ModelInferRequest")
    with served.client() as client:  # the worker survived both
        np.testing.assert_allclose(client.infer("demo", {"x": np.ones((1, 4), np.float32)})["y"],
                                   reference(np.ones((1, 4), np.float32)), rtol=1e-5, atol=1e-5)
        with pytest.raises(grpc.RpcError) as err:
            client.stub.ModelMetadata(pb.ModelMetadataRequest(name="demo", version="7"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "model 'demo' has no version '7' (loaded: '')"


def test_unknown_model(served):
    with served.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.infer("nope", {"x": np.zeros((1, 4), np.float32)})
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "unknown model 'nope'"
        assert client.model_ready("nope") is False
        with pytest.raises(grpc.RpcError) as err:
            client.metadata("nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_unload_load_cycle(served):
    x = np.ones((1, 4), np.float32)
    with served.client() as client:
        client.unload("demo")
        assert client.model_ready("demo") is False
        assert client.status("demo").state == "UNLOADED"
        with pytest.raises(grpc.RpcError) as err:
            client.infer("demo", {"x": x})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unloaded" in err.value.details()
        client.load("demo")
        assert client.model_ready("demo") is True
        np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5, atol=1e-5)


def test_worker_runs_as_unprivileged_uid(served):
    worker = worker_python(served)
    import pwd
    expected = pwd.getpwnam("sealbox-worker").pw_uid
    assert worker.uids().real == worker.uids().effective == expected != 0
    # bwrap itself, the worker's parent, never runs as root either.
    for pid in served.worker_pids():
        assert psutil.Process(pid).uids().effective != 0


def test_worker_network_is_a_downed_loopback_only(served):
    """Looked at from the host, inside the worker's own network namespace."""
    worker = worker_python(served)
    assert os.readlink(f"/proc/{worker.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    links = subprocess.run(["nsenter", "-t", str(worker.pid), "-n", "ip", "-o", "link", "show"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(links) == 1, links
    assert links[0].split(":")[1].strip() == "lo"
    assert "state DOWN" in links[0] and "UP" not in links[0].split("<")[1].split(">")[0].split(",")


def test_kill_9_worker_turns_unavailable_then_recovers(served):
    x = np.ones((2, 4), np.float32)
    with served.client() as client:
        client.infer("demo", {"x": x})
        worker_python(served).send_signal(signal.SIGKILL)
        # Until the restart, calls fail with UNAVAILABLE naming the death.
        saw_unavailable = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client.infer("demo", {"x": x})
                if saw_unavailable:
                    break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                saw_unavailable = True
            time.sleep(0.02)
        assert saw_unavailable
        np.testing.assert_allclose(client.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5, atol=1e-5)
        assert client.ready()
    died = [e for e in served.audit_events() if e["event"] == "worker_died"]
    assert died and "killed by SIGKILL" in died[0]["reason"]
    assert served.proc.poll() is None


def test_sigterm_leaves_no_process_behind(served):
    pids = served.worker_pids()
    assert pids
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0
    time.sleep(0.5)
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert not os.path.exists(served.socket)


def test_malformed_config_names_file_and_key(tmp_path):
    config = tmp_path / "bad.toml"
    _, public = make_ec_key(tmp_path)
    policy = f'[policy]\nsources = ["{tmp_path}"]\npublic_keys = ["{public}"]\n'
    config.write_text('[workers]\nmemory_mb = "lots"\n')
    result = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"sealboxd: config refused: {config}: [workers]: key 'memory_mb' must be int or float, not str"
    config.write_text(policy + '[models.m]\npath = "x"\nformat = "onnx"\n')
    result = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "[models.m]: key 'format' must be one of ['flux', 'julia', 'mlx', 'mlx-lm'], not 'onnx'" in result.stderr
    config.write_text('[server]\nmax_message_mb = 4096\n')
    result = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "[server]: key 'max_message_mb' must be below 2048 (gRPC's limit), not 4096" in result.stderr
    config.write_text('[server]\ntcp = "0.0.0.0:8001"\n')
    result = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "key 'tcp' must be a loopback address with a port, not '0.0.0.0:8001'" in result.stderr


@pytest.mark.parametrize("workers, expected", [
    ('user = "no-such-worker"', "uid: worker user 'no-such-worker' does not exist"),
    ('python = "/root/.pyenv/versions/3.11.7/bin/python3"', "runtime: the worker user 'sealbox-worker' cannot run"),
])
def test_daemon_refuses_to_start_when_workers_cannot_be_sandboxed(tmp_path, demo_model, keys, workers, expected):
    if "pyenv" in workers and not os.path.exists("/root/.pyenv/versions/3.11.7/bin/python3"):
        pytest.skip("root's pyenv Python is not on this machine")
    from tests.support.daemon import Daemon
    daemon = Daemon(tmp_path, {"demo": {"path": demo_model}}, keys[1], workers=workers)
    result = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(daemon.config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert expected in result.stderr
    assert not os.path.exists(daemon.socket)   # nothing was served
