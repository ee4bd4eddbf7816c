"""The launcher renders one SandboxProfile value for each platform."""
import os
import shutil

import pytest

from tests.support.daemon import Daemon
from tests.support.pki import upstream_sign
from sealbox.daemon.audit import AuditLog
from sealbox.daemon.config import load_config
from sealbox.daemon.supervisor import ModelUnavailable, Supervisor


def test_launcher_renders_the_worker_profile_into_a_sandbox_exec_command(tmp_path):
    """The same SandboxProfile value that drives bubblewrap on Linux drives sandbox-exec on macOS."""
    from sealbox.proto.contract import SandboxSpec, WorkerSpec
    from sealbox.sandbox.launcher import seatbelt_command
    from sealbox.sandbox.profile import SandboxProfile

    profile = SandboxProfile(engine="mlx", python="/opt/sealbox/venv/bin/python",
                             runtime_paths=("/opt/sealbox/venv", "/opt/sealbox/code"))
    sock_dir, tmp_dir = tmp_path / "sock", tmp_path / "tmp"
    spec = WorkerSpec(SandboxSpec(engine="mlx"))
    command = seatbelt_command(profile, str(sock_dir), str(tmp_dir), [str(tmp_path / "model")], spec)
    assert command[:2] == ["/usr/bin/sandbox-exec", "-p"]
    assert command[3:] == ["/opt/sealbox/venv/bin/python", "-m", "sealbox.worker.main", spec.to_json()]
    text = command[2]
    assert text.startswith("(version 1)\n(deny default)\n")
    for path in ("/opt/sealbox/venv", "/opt/sealbox/code", str(tmp_path / "model")):
        assert f'(subpath "{os.path.realpath(path)}")' in text
    writable = text.split("(allow file-write*\n", 1)[1].split("\n)\n", 1)[0]
    assert [line.strip() for line in writable.splitlines()] == [
        f'(subpath "{os.path.realpath(sock_dir)}")', f'(subpath "{os.path.realpath(tmp_dir)}")']
    assert f'(path-literal "{os.path.realpath(sock_dir)}/worker.sock")' in text
    assert '(allow process-exec (literal "' in text and "(deny process-fork)" in text
    assert "network-outbound" not in text


def test_julia_models_get_julia_read_only_and_fail_closed_without_a_syscall_allowlist(tmp_path, demo_model, keys):
    """Julia can't be installed here: the profile is checked, and the launch refuses (seccomp has no
    measured Julia allowlist yet), naming the layer; no worker starts."""
    julia_root = tmp_path / "julia"
    (julia_root / "bin").mkdir(parents=True)
    shutil.copy("/bin/true", julia_root / "bin" / "julia")
    (tmp_path / "depot").mkdir()
    model = tmp_path / "models" / "flux"
    model.mkdir(parents=True)
    shutil.copyfile(demo_model / "model.json", model / "model.bson")
    upstream_sign(model, keys[0])
    daemon = Daemon(tmp_path, {"flux": {"path": model, "format": "julia", "load": False}}, keys[1],
                    workers=f'julia = "{julia_root}/bin/julia"\njulia_depot = "{tmp_path}/depot"')
    config = load_config(str(daemon.config))
    supervisor = Supervisor(config, AuditLog())
    profile = supervisor.profile_for(config.models["flux"])
    assert profile.extra_ro_paths == (str(julia_root), f"{tmp_path}/depot")
    env = profile.worker_environment()
    assert env["PYTHON_JULIAPKG_EXE"] == f"{julia_root}/bin/julia" and env["PYTHON_JULIAPKG_OFFLINE"] == "yes"
    assert env["JULIA_DEPOT_PATH"] == f"{tmp_path}/depot"
    with pytest.raises(ModelUnavailable) as err:
        supervisor.load("flux")
    assert "seccomp: no syscall allowlist for engine 'julia'" in str(err.value)
    assert supervisor.models["flux"].worker is None
    supervisor.shutdown()
