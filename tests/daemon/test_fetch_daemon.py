"""A remote model in a real sealboxd: `source = "https://..."` served from a real nginx on loopback.

Fetched by the sandboxed helper into the store under state_dir, verified there, served end to end;
FETCHING with progress while it downloads; a second load refused while it fetches; a tampered file
refused with nothing served; a fetch timeout that does not hold the start-up; the fetch audited;
start-up fetches waiting in line for a slot while a repository-API load is refused at once.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from tests.daemon.test_reload import hup
from tests.support.https import Nginx
from tests.support.models import build_mlp_model, reference
from tests.support.pki import make_model, upstream_sign

from sealbox.client import publisher as publisher_cli

CLI = [sys.executable, "-c", "import sys; from sealbox.client.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    server = Nginx(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


def test_remote_model_fetched_verified_served_and_audited(nginx, demo_model, keys, daemon_factory, tmp_path):
    url = nginx.publish(demo_model, "models/demo")
    (nginx.docroot / "models/demo/unsigned.bin").write_bytes(b"never requested")
    before = len(nginx.requests())
    d = daemon_factory({"demo": {"source": url, "options": f'source_ca = "{nginx.ca}"'}}, keys[1]).start()
    with d.client() as c:
        assert c.status("demo").state == "READY"
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        np.testing.assert_allclose(c.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5)
    time.sleep(0.2)
    uris = sorted(line.split()[1] for line in nginx.requests()[before:])
    signed = sorted(p.relative_to(demo_model).as_posix() for p in demo_model.rglob("*")
                    if p.is_file() and p.name != "model.sig")
    assert uris == sorted(["/models/demo/model.sig", "/models/demo/model.release.sig"]
                          + [f"/models/demo/{n}" for n in signed])
    fetch = [e for e in d.audit_events() if e["event"] == "model_fetch"]
    assert len(fetch) == 1 and fetch[0]["verdict"] == "accepted" and fetch[0]["location"] == url
    assert fetch[0]["peer"].startswith(f"127.0.0.1:{nginx.port}") and "commonName=127.0.0.1" in fetch[0]["peer"]
    assert fetch[0]["bytes"] == sum((demo_model / n).stat().st_size for n in signed)
    assert sorted(fetch[0]["files"]) == signed and all(v.startswith("sha256:") for v in fetch[0]["files"].values())
    verify = [e for e in d.audit_events() if e["event"] == "model_verify"]
    assert verify[-1]["verdict"] == "accepted" and verify[-1]["source"] == fetch[0]["view"]
    # The store as `sealbox store` sees it; gc keeps the view the model serves from.
    state = d.dir / "state"
    r = subprocess.run([*CLI, "store", "gc", "--state-dir", str(state)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.endswith("gc: 0 view(s), 0 blob(s) removed\n")
    r = subprocess.run([*CLI, "store", "ls", "--state-dir", str(state)], capture_output=True, text=True)
    assert r.stdout.count("1 view(s)") == len(signed) and f"view\tdemo/{os.path.basename(fetch[0]['view'])}" in r.stdout
    # `sealbox load` fetches again: only the signature and release are requested (files are stored).
    before = len(nginx.requests())
    with d.admin_client() as c:
        c.load("demo")
        assert c.status("demo").state == "READY"
    time.sleep(0.2)
    assert sorted(line.split()[1] for line in nginx.requests()[before:]) == [
        "/models/demo/model.release.sig", "/models/demo/model.sig"]


def _big_unloadable_model(tmp_path, keys):
    """Signed, 8 MiB, not an MLX model: it fetches (slowly, /slow/) and then fails to load."""
    model = make_model(tmp_path / "big", {"big.bin": os.urandom(8 << 20), "config.json": b"{}"})
    assert publisher_cli.main(["sign", "key", str(model), "--private-key", str(keys[0])]) == 0
    return model


def test_fetching_state_progress_and_one_fetch_per_model(nginx, keys, daemon_factory, tmp_path):
    url = nginx.publish(_big_unloadable_model(tmp_path, keys), "slow/big")
    d = daemon_factory({"big": {"source": url, "options": f'source_ca = "{nginx.ca}"'}}, keys[1]).start(wait=False)
    seen, refused = [], []
    deadline = time.monotonic() + 60
    with d.admin_client() as c:
        while time.monotonic() < deadline:
            try:
                m = c.status("big")
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            if m.state == "FETCHING":
                seen.append(m.reason)
                if not refused:
                    with pytest.raises(grpc.RpcError) as info:
                        c.load("big")
                    refused.append(info.value)
            elif seen and m.state not in ("LOADING", "FETCHING"):
                break
            time.sleep(0.05)
        final = c.status("big")
    assert seen, "never saw FETCHING"
    assert any(r.startswith(f"fetching {url}: ") and "MiB received (big.bin)" in r for r in seen), seen
    assert refused[0].code() == grpc.StatusCode.UNAVAILABLE and "is being fetched already" in refused[0].details()
    assert final.state == "UNAVAILABLE"   # fetched and verified, but not an MLX model
    r = subprocess.run([*CLI, "--admin-target", d.admin_target, "--target", d.target, "status", "big"],
                       capture_output=True, text=True)
    assert "state:   UNAVAILABLE" in r.stdout


def test_fetch_timeout_does_not_hold_startup(nginx, keys, daemon_factory, tmp_path):
    url = nginx.publish(_big_unloadable_model(tmp_path, keys), "slow/timeout")
    d = daemon_factory({"t": {"source": url, "options": f'source_ca = "{nginx.ca}"\nfetch_timeout_s = 1'}}, keys[1])
    started = time.monotonic()
    d.start()
    assert time.monotonic() - started < 30
    with d.admin_client() as c:
        m = c.status("t")
    assert m.state == "UNAVAILABLE"
    assert m.reason.startswith(f"verification refused: {url}big.bin: transfer: the fetch took longer than its 1 s")
    import hashlib
    big = (nginx.docroot / "slow/timeout/big.bin").read_bytes()
    assert hashlib.sha256(big).hexdigest() not in os.listdir(d.dir / "state/store/sha256")
    assert os.listdir(d.dir / "state/store/tmp") == []
    assert [e for e in d.audit_events() if e["event"] == "model_fetch"][-1]["verdict"] == "refused"


def test_tampered_remote_model_refused_nothing_served(nginx, demo_model, keys, daemon_factory, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_model, copy)
    url = nginx.publish(copy, "models/tampered-demo")
    victim = sorted(p for p in (nginx.docroot / "models/tampered-demo").rglob("*") if p.is_file()
                    and p.name != "model.sig")[0]
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    d = daemon_factory({"demo": {"source": url, "options": f'source_ca = "{nginx.ca}"'}}, keys[1]).start()
    with d.admin_client() as c:
        m = c.status("demo")
    name = victim.relative_to(nginx.docroot / "models/tampered-demo").as_posix()
    assert m.state == "UNAVAILABLE"
    assert m.reason == (f"verification refused: {url}{name}: digest: sha256 digest differs from the signed one; "
                        "not stored")
    assert d.worker_pids() == []
    assert os.listdir(d.dir / "state/store/views") == []


def test_remote_model_from_an_oci_registry_served(demo_model, keys, daemon_factory, tmp_path):
    from tests.support.registry import Registry
    registry = Registry(tmp_path / "registry")
    try:
        digest = registry.push(demo_model, "models/demo:v1")
        source = f"oci://{registry.host}/models/demo:v1"
        d = daemon_factory({"demo": {"source": source, "options": f'source_ca = "{registry.ca}"'}}, keys[1]).start()
        with d.client() as c:
            assert c.status("demo").state == "READY"
            x = np.ones((1, 4), dtype=np.float32)
            np.testing.assert_allclose(c.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5)
        fetch = [e for e in d.audit_events() if e["event"] == "model_fetch"][-1]
        assert fetch["verdict"] == "accepted" and fetch["peer"].endswith(f"; manifest {digest}")
    finally:
        registry.stop()


def test_startup_fetches_wait_in_line_and_api_load_refused_at_once(nginx, keys, daemon_factory, tmp_path):
    """Three slow remote models at start-up and two fetch slots: the third waits in line (FETCHING,
    "waiting to fetch") and all three become READY; a repository-API load meanwhile is refused at once."""
    models = {}
    for name in ("a", "b", "c", "d"):
        build_mlp_model(tmp_path / name, 5)   # ~5 MiB of weights: ~2 s each behind /slow/ (2 MiB/s after 1 MiB)
        upstream_sign(tmp_path / name, keys[0])
        url = nginx.publish(tmp_path / name, f"slow/q{name}")
        models[name] = {"source": url, "options": f'source_ca = "{nginx.ca}"\nfetch_timeout_s = 120'}
    models["d"]["load"] = False
    d = daemon_factory(models, keys[1]).start(wait=False)
    waiting, refused = [], []
    deadline = time.monotonic() + 60
    with d.admin_client() as c:
        while time.monotonic() < deadline and not refused:
            try:
                states = {m.name: (m.state, m.reason) for m in c.models()}
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            waiting += [(n, r) for n, (s, r) in states.items() if s == "FETCHING" and r.startswith("waiting")]
            if waiting:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    c.load("d")
                refused.append((info.value, time.monotonic() - started))
            time.sleep(0.05)
    assert waiting, "no start-up fetch waited in line"
    name, reason = waiting[0]
    assert reason == f"waiting to fetch {models[name]['source']}: 2 fetches are in progress"
    error, took = refused[0]
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "model 'd': 2 fetches are in progress; try again later"
    assert took < 2, f"the repository-API load waited {took:.1f} s for a slot"
    d.wait_ready(timeout=120)
    with d.client() as c:
        for name in ("a", "b", "c"):
            assert c.status(name).state == "READY", (name, c.status(name).reason)
            side = c.metadata(name).inputs[0].shape[-1]
            assert c.infer(name, {"x": np.ones((1, side), dtype=np.float32)})["y"].shape == (1, side)
    fetched = [e for e in d.audit_events() if e["event"] == "model_fetch"]
    assert sorted(e["model"] for e in fetched if e["verdict"] == "accepted") == ["a", "b", "c"]
    assert [e for e in fetched if e["verdict"] != "accepted"] == []


def _versioned(demo_model, path, keys, version, extra=None):
    """A copy of the demo model (plus `extra` files) signed by sealbox's publisher CLI with a release statement."""
    shutil.copytree(demo_model, path, ignore=shutil.ignore_patterns("model.sig", "model.release.sig"))
    for name, data in (extra or {}).items():
        (path / name).write_bytes(data)
    assert publisher_cli.main(["sign", "key", str(path), "--private-key", str(keys[0]), "--version", version,
                               "--model-name", "demo"]) == 0
    return path


def test_sighup_with_remote_sources(nginx, demo_model, keys, daemon_factory, tmp_path):
    """A remote model added by SIGHUP is fetched and served; a changed source hands over while the old
    version serves (no call fails); a refused new version leaves the old one serving, audited; an
    unchanged source is not fetched again on SIGHUP, and `sealbox load` fetches it again."""
    import threading
    v1 = nginx.publish(_versioned(demo_model, tmp_path / "v1", keys, "1.0"), "models/hup-v1")
    v2 = nginx.publish(_versioned(demo_model, tmp_path / "v2", keys, "2.0"), "models/hup-v2")
    # 3.0 signs a file the store does not hold yet (a signed digest already stored is never requested),
    # then the server's copy is tampered with.
    v3 = nginx.publish(_versioned(demo_model, tmp_path / "v3", keys, "3.0", {"extra.bin": os.urandom(4096)}),
                       "models/hup-v3")
    with open(nginx.docroot / "models/hup-v3/extra.bin", "r+b") as f:
        f.write(b"X")
    second = nginx.publish(demo_model, "models/hup-second")
    ca = f'source_ca = "{nginx.ca}"'
    d = daemon_factory({"demo": {"source": v1, "options": ca}}, keys[1]).start()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    failures, calls, stop = [], [], threading.Event()

    def call():
        with d.client() as c:
            while not stop.is_set():
                try:
                    np.testing.assert_allclose(c.infer("demo", {"x": x})["y"], reference(x), rtol=1e-5)
                    calls.append(time.monotonic())
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        # Added by SIGHUP: fetched, verified, served.
        base = d.config.read_text()
        d.config.write_text(base + f'[models.second]\nsource = "{second}"\nformat = "mlx"\n{ca}\n')
        event = hup(d)
        assert event["verdict"] == "accepted" and event.get("added") == ["second"], event
        with d.client() as c:
            assert c.status("second").state == "READY"
            np.testing.assert_allclose(c.infer("second", {"x": x})["y"], reference(x), rtol=1e-5)
        # A changed source: fetched and handed over while 1.0 serves.
        d.config.write_text(d.config.read_text().replace(v1, v2))
        event = hup(d)
        assert event["verdict"] == "accepted" and event.get("replaced") == ["demo"], event
        with d.client() as c:
            assert c.status("demo").state == "READY" and c.status("demo").version == "2.0"
        # A refused new version (a tampered file): 2.0 serves on, audited.
        d.config.write_text(d.config.read_text().replace(v2, v3))
        event = hup(d)
        assert event["verdict"] == "accepted" and event.get("refused") == ["demo"], event
        with d.client() as c:
            assert c.status("demo").state == "READY" and c.status("demo").version == "2.0"
        update = [e for e in d.audit_events() if e["event"] == "model_update"]
        assert [(e["model"], e["verdict"], e["serving"]) for e in update] == [("demo", "refused", "2.0")]
        assert update[0]["reason"] == (f"verification refused: {v3}extra.bin: digest: sha256 digest "
                                       "differs from the signed one; not stored")
        # Back to v2's source, re-published in place as 2.1 (a moved tag): a SIGHUP compares the
        # source only, so nothing is requested; `sealbox load` fetches the signature again and hands over.
        d.config.write_text(d.config.read_text().replace(v3, v2))
        hup(d)
        _versioned(demo_model, tmp_path / "v21", keys, "2.1")
        nginx.publish(tmp_path / "v21", "models/hup-v2")
        before = len(nginx.requests())
        assert "replaced" not in hup(d)
        time.sleep(0.2)
        assert nginx.requests()[before:] == []
        with d.admin_client() as c:
            c.load("demo")
            assert c.status("demo").version == "2.1"
        time.sleep(0.5)
    finally:
        stop.set()
        caller.join(30)
    assert failures == [] and len(calls) > 10
    fetched = [(e["location"], e["verdict"]) for e in d.audit_events() if e["event"] == "model_fetch"]
    assert fetched == [(v1, "accepted"), (second, "accepted"), (v2, "accepted"), (v3, "refused"),
                       (v2, "accepted"), (v2, "accepted")]
