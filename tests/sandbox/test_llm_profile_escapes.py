"""The mlx-lm worker profile allows what the other workers do not: mkdir and symlink (Landlock's MAKE_DIR
and MAKE_SYM) in the worker's private /tmp, statx, and 4096 open files (sandbox/profile.py,
sandbox/seccomp.py). Escape attempts that use exactly these, from inside a real sandbox with that profile
(launcher.run_tool, as `sealbox sandbox run-python` runs a script): a symlink in /tmp to a host file, or
through /proc/1/root, reads nothing; nothing can be made outside /tmp; statx sees no host path. Controls: the
same host file is readable by the worker uid outside the sandbox, and the mlx profile kills mkdir."""
from __future__ import annotations

import json
import os
import pathlib
import pwd
import signal
import subprocess
import sys

import pytest

from sealbox.proto.contract import ToolRun
from sealbox.sandbox.launcher import run_tool
from sealbox.sandbox.profile import SandboxProfile
from sealbox.sandbox.tools import SCRIPT_IN_SANDBOX

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the worker sandbox is Linux-only"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox is started as root"),
]

HOST_DIR = pathlib.Path("/run/sealbox-test-llm-escape")   # outside every worker's view
SECRET = HOST_DIR / "secret"

PROBE = r"""
import errno, json, os, sys
secret = sys.argv[1]
def attempt(name, fn):
    try:
        fn()
        outcome = "ok"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno, str(exc.errno))
    print(json.dumps({"attempt": name, "outcome": outcome}), flush=True)

def read(path):
    with open(path, "rb") as f:
        f.read()

attempt("mkdir in /tmp", lambda: os.mkdir("/tmp/made"))
attempt("symlink in /tmp", lambda: os.symlink("/tmp/made", "/tmp/link"))
attempt("symlink to a host file, read", lambda: (os.symlink(secret, "/tmp/to-host"), read("/tmp/to-host")))
attempt("symlink through /proc/1/root, read",
        lambda: (os.symlink("/proc/1/root" + secret, "/tmp/via-proc"), read("/tmp/via-proc")))
attempt("statx of the host file", lambda: os.stat(secret))
attempt("mkdir outside /tmp", lambda: os.mkdir("/usr/made-by-worker"))
attempt("symlink outside /tmp", lambda: os.symlink("/tmp/made", "/usr/link-by-worker"))
attempt("symlink in the read-only /", lambda: os.symlink("/tmp/made", "/link-by-worker"))
"""


@pytest.fixture(scope="module")
def secret():
    HOST_DIR.mkdir(mode=0o755, exist_ok=True)
    SECRET.write_bytes(b"host secret\n")
    SECRET.chmod(0o644)   # readable by the worker uid outside the sandbox: only the sandbox stops it
    yield str(SECRET)
    SECRET.unlink()
    HOST_DIR.rmdir()


def run_probe(engine: str, secret: str, capfd) -> tuple[int, dict[str, str]]:
    profile = SandboxProfile.for_model(engine)
    code = run_tool(profile, ToolRun("script", SCRIPT_IN_SANDBOX, (secret,)),
                    extra_files={SCRIPT_IN_SANDBOX: PROBE.encode()})
    out = capfd.readouterr().out
    outcomes = {r["attempt"]: r["outcome"] for r in map(json.loads, filter(None, out.splitlines()))}
    return code, outcomes


def test_the_mlx_lm_profiles_extra_permissions_reach_nothing_outside_tmp(secret, capfd):
    code, outcomes = run_probe("mlx-lm", secret, capfd)
    assert code == 0, outcomes
    # Making anything outside /tmp: the read-only bind (EROFS) or Landlock (EACCES), whichever checks first.
    for outside in ("mkdir outside /tmp", "symlink outside /tmp", "symlink in the read-only /"):
        assert outcomes.pop(outside) in ("EROFS", "EACCES"), outside
    assert outcomes == {
        "mkdir in /tmp": "ok",                              # what the profile allows (mlx_lm.load's directory)
        "symlink in /tmp": "ok",
        "symlink to a host file, read": "ENOENT",           # the link is made; the host file is not in the view
        "symlink through /proc/1/root, read": "EACCES",     # the sandbox's pid 1 (bwrap): no ptrace access
        "statx of the host file": "ENOENT",
    }


def test_control_the_worker_uid_reads_the_host_file_outside_the_sandbox(secret):
    entry = pwd.getpwnam("sealbox-worker")
    out = subprocess.run([sys.executable, "-c", f"print(open({secret!r}).read(), end='')"], capture_output=True,
                         text=True, user=entry.pw_uid, group=entry.pw_gid, extra_groups=[], timeout=60)
    assert out.returncode == 0 and out.stdout == "host secret\n", out.stderr


def test_control_the_mlx_profile_kills_mkdir(secret, capfd):
    code, outcomes = run_probe("mlx", secret, capfd)
    assert code == 128 + signal.SIGSYS, (code, outcomes)   # seccomp: mkdir is not in the mlx allowlist
    assert outcomes == {}
