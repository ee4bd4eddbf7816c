"""--check-config refuses each bad case with the key, the path and the check (no worker started);
a starting daemon removes the worker directories and cgroups a daemon that died left behind."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

from tests.support import PYTHON, RUN_ROOT

DEAD = 4194305   # above the kernel's largest pid (pid_max <= 2^22): never a live process


def check(config):
    return subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(config), "--check-config"],
                          capture_output=True, text=True, timeout=60, cwd="/")


@pytest.fixture
def write_config(tmp_path, demo_model, keys):
    """A config that passes every check; `changes` swap one line or add lines to a table."""
    base = tmp_path / "srv"
    base.mkdir()
    os.chmod(tmp_path, 0o755)
    lines = {"state_dir": f'state_dir = "{base / "state"}"', "run_dir": f'run_dir = "{base / "run"}"',
             "audit_log": f'audit_log = "{base / "log" / "audit.jsonl"}"', "server": "",
             "user": 'user = "sealbox-worker"', "python": f'python = "{PYTHON}"',
             "keys": f'public_keys = ["{keys[1]}"]', "sources": f'sources = ["{demo_model.parent}"]',
             "path": f'path = "{demo_model}"'}

    def write(**changes):
        values = dict(lines, **changes)
        config = tmp_path / "sealboxd.toml"
        config.write_text("\n".join([
            "[server]", values["state_dir"], values["run_dir"], values["audit_log"], values["server"],
            "[workers]", values["user"], values["python"],
            "[policy]", values["sources"], values["keys"],
            "[models.demo]", values["path"]]) + "\n")
        return config
    return write


def test_a_good_config_passes_and_state_dir_is_created_root_0700(write_config, tmp_path):
    config = write_config()
    result = check(config)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"sealboxd: {config}: OK (1 models)\n"
    st = os.stat(tmp_path / "srv" / "state")
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o700
    assert not (tmp_path / "srv" / "run").exists()   # only checked, never made: no worker started


def test_check_config_refuses_each_bad_case_with_the_path_and_the_check(write_config, tmp_path, demo_model,
                                                                       request):
    srv = tmp_path / "srv"
    afile = srv / "afile"
    afile.write_text("")
    outside = tmp_path / "elsewhere" / "demo"
    shutil.copytree(demo_model, outside)
    open_state = srv / "open-state"
    open_state.mkdir(mode=0o755)
    os.chmod(open_state, 0o755)
    users_state = srv / "users-state"
    users_state.mkdir(mode=0o700)
    os.chown(users_state, 65534, 65534)
    os.makedirs(RUN_ROOT, mode=0o711, exist_ok=True)   # searchable by anyone, unlike pytest's tmp_path
    searchable = pathlib.Path(tempfile.mkdtemp(dir=RUN_ROOT))
    os.chmod(searchable, 0o711)
    hidden = searchable / "hidden"
    hidden.mkdir(mode=0o700)
    private_python = hidden / "python3"
    shutil.copy("/usr/bin/true", private_python)
    request.addfinalizer(lambda: shutil.rmtree(searchable))
    cases = [
        (dict(path=f'path = "{srv / "missing"}"'),
         f"[models.demo] path {srv / 'missing'}: exists: no such file or directory"),
        (dict(path=f'path = "{outside}"'),
         f"[models.demo] path {outside}: inside sources: resolves to {outside}, which is not under an allowed "
         f"source ({demo_model.parent})"),
        (dict(state_dir=f'state_dir = "{open_state}"'),
         f"[server] state_dir {open_state}: owned by root with mode 0700: it is a directory owned by uid 0 "
         "with mode 0755"),
        (dict(state_dir=f'state_dir = "{users_state}"'),
         f"[server] state_dir {users_state}: owned by root with mode 0700: it is a directory owned by uid 65534 "
         "with mode 0700"),
        (dict(state_dir=f'state_dir = "{afile / "state"}"'),
         f"[server] state_dir {afile / 'state'}: creatable: Not a directory"),
        (dict(run_dir=f'run_dir = "{afile / "run"}"'),
         f"[server] run_dir {afile / 'run'}: creatable: {afile} is not a directory"),
        (dict(audit_log=f'audit_log = "{afile / "log" / "audit.jsonl"}"'),
         f"[server] audit_log {afile / 'log'}: creatable: {afile} is not a directory"),
        (dict(python=f'python = "{private_python}"'),
         f"[workers] python {private_python}: executable by 'sealbox-worker': cannot search {hidden} "
         "(mode 0700, owner uid 0)"),
        (dict(user='user = "no-such-user-here"'), "[workers] user 'no-such-user-here': exists: no such user"),
        (dict(user='user = "root"'), "[workers] user 'root': not root: it has uid 0"),
    ]
    for changes, message in cases:
        config = write_config(**changes)
        result = check(config)
        assert result.returncode == 2, (changes, result.stdout)
        assert result.stderr == f"sealboxd: check failed: {config}: {message}\n", changes
    # Key and certificate files are read when the config is parsed: refused, naming the file.
    missing_key = srv / "missing.pub"
    config = write_config(keys=f'public_keys = ["{missing_key}"]')
    result = check(config)
    assert result.returncode == 2
    assert result.stderr == (f"sealboxd: config refused: {config}: [policy]: public_keys: {missing_key}: "
                             f"[Errno 2] No such file or directory: '{missing_key}'\n")
    config = write_config(server=f'[[server.listeners]]\naddress = "127.0.0.1:8443"\ntls_cert = "{srv / "no.pem"}"\n'
                                 f'tls_key = "{srv / "no.key"}"')
    result = check(config)
    assert result.returncode == 2
    assert result.stderr == (f"sealboxd: config refused: {config}: [[server.listeners]] #1: key 'tls_cert': "
                             f"cannot read {srv / 'no.pem'}: No such file or directory\n")


def test_start_removes_what_a_dead_daemon_left_and_nothing_else(daemon_factory, demo_model, keys):
    from sealbox.sandbox.cgroups import worker_group_parents
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1])
    run_dir = daemon.run_dir
    stale_dir = os.path.join(run_dir, f"{DEAD}-demo-1")
    alive_dir = os.path.join(run_dir, f"{os.getpid()}-demo-1")   # a live process's: not ours to judge
    other_dir = os.path.join(run_dir, "not-sealbox")
    for d in (stale_dir, alive_dir, other_dir):
        os.makedirs(d)
    groups = []
    for parent in worker_group_parents(existing_only=False):
        os.makedirs(parent, exist_ok=True)
        stale, kept = os.path.join(parent, f"{DEAD}-{DEAD}-demo-1"), os.path.join(parent, f"{os.getpid()}-x-1")
        os.mkdir(stale)
        os.mkdir(kept)
        groups.append((stale, kept))
    assert groups
    try:
        daemon.start()
        assert not os.path.exists(stale_dir)
        assert os.path.isdir(alive_dir) and os.path.isdir(other_dir)
        log = daemon.stderr_path.read_text()
        assert f"removed {stale_dir}, left behind by a daemon that is gone" in log
        for stale, kept in groups:
            assert not os.path.exists(stale) and os.path.isdir(kept)
            assert f"removed {stale}, left behind by a daemon that is gone" in log
        with daemon.client() as client:
            assert client.status("demo").state == "READY"
    finally:
        for _stale, kept in groups:
            os.rmdir(kept)
