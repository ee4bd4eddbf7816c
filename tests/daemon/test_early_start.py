"""warm_pool = 0: a load starts its worker while the model is verified (daemon/warm_pool.py, EarlyStart).
The worker gets the sealed fds only once verification succeeded, with every layer a worker spawned after
verification has; a refused model never reaches it, and it is gone when the refusal is answered."""
from __future__ import annotations

import os
import shutil
import signal

import grpc
import numpy as np
import pytest

from tests.daemon.test_warm_pool import X, memory_max, pythons, status_of
from tests.support import wait_for
from tests.support.models import reference


def loads(daemon, model):
    return [e for e in daemon.audit_events() if e["event"] == "model_load" and e["model"] == model]


def test_an_early_started_worker_serves_exactly_with_every_layer(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"a": {"path": demo_model, "load": False, "options": "memory_mb = 512"}},
                            keys[1]).start()
    with daemon.client() as client:
        client.load("a")
        np.testing.assert_allclose(client.infer("a", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
        (event,) = loads(daemon, "a")
        assert event["verdict"] == "ready" and event["path"] == "early"
        assert event["verify_s"] > 0 and event["spawn_s"] > 0
        ((bwrap, python),) = pythons(daemon, "a-")   # its socket directory is named after its model
        assert bwrap.pid == event["worker_pid"]
        early = status_of(python.pid)
        assert memory_max(python.pid) == str(512 * 2**20)   # the model's limit, not [workers]'
        # The same layers as a worker spawned for the model: its restart (no load, so no early start).
        os.kill(python.pid, signal.SIGKILL)
        restart = wait_for(lambda: [e for e in loads(daemon, "a")[1:] if e["verdict"] == "ready"],
                           what="the restart")[-1]
        assert restart["path"] == "spawn"
        ((_, respawned),) = [p for p in pythons(daemon, "a-") if p[1].is_running() and p[0].pid != bwrap.pid]
        spawned = status_of(respawned.pid)
        for key in ("Uid", "Gid", "NoNewPrivs", "Seccomp", "Seccomp_filters", "CapEff", "CapBnd"):
            assert early[key] == spawned[key], key
        assert memory_max(respawned.pid) == str(512 * 2**20)
        np.testing.assert_allclose(client.infer("a", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)


def test_a_refused_model_never_reaches_the_early_worker(tmp_path, daemon_factory, demo_model, keys):
    tampered = tmp_path / "tampered"
    shutil.copytree(demo_model, tampered)
    weights = next(p for p in tampered.iterdir() if p.suffix in (".safetensors", ".mlxfn"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(data)
    daemon = daemon_factory({"t": {"path": tampered, "load": False}}, keys[1]).start()
    with daemon.client() as client:
        with pytest.raises(grpc.RpcError) as err:
            client.load("t")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == (f"model 't': verification refused: {weights}: digest: sha256 digest differs "
                                       f"from the one in {tampered / 'model.sig'}")
        # The worker started for this load is gone by the time the refusal is answered.
        assert pythons(daemon, "t-") == []
        assert [d for d in os.listdir(daemon.run_dir) if "-t-" in d] == []
        assert client.status("t").state == "UNAVAILABLE"
        with pytest.raises(grpc.RpcError) as err:
            client.infer("t", {"x": X})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [e["verdict"] for e in loads(daemon, "t")] in ([], ["refused"])


def test_early_start_false_spawns_after_verifying(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"a": {"path": demo_model, "load": False}}, keys[1], workers="early_start = false").start()
    with daemon.client() as client:
        client.load("a")
        np.testing.assert_allclose(client.infer("a", {"x": X})["y"], reference(X), rtol=1e-5, atol=1e-5)
    (event,) = loads(daemon, "a")
    assert event["verdict"] == "ready" and event["path"] == "spawn"
