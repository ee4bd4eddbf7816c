"""`sealbox sandbox check`: every field checked against what this machine really has.

Expectations come from independent sources where there is one (dpkg, getent,
findmnt, bwrap itself, /proc), and from the measured facts of this machine
kind (measured on these Debian 12 CI machines) where there is none: Landlock ABI 7,
hybrid cgroups with memory and pids on v1 and cgroup2 at /sys/fs/cgroup/unified.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from sealbox.sandbox import hostcheck

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the host check reports Linux layers")
SEALBOX = str(pathlib.Path(sys.executable).with_name("sealbox"))


def run(*args) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout.strip()


@pytest.fixture(scope="module")
def report():
    return hostcheck.host_report()


def test_platform(report):
    uname = os.uname()
    assert report["platform"] == {"system": "Linux", "release": uname.release, "machine": uname.machine}


def test_bubblewrap(report):
    assert report["bubblewrap"]["path"] == shutil.which("bwrap") == "/usr/bin/bwrap"
    assert run("/usr/bin/bwrap", "--version") == f"bubblewrap {report['bubblewrap']['version']}"
    assert run("dpkg-query", "-W", "-f", "${Version}", "bubblewrap").startswith(report["bubblewrap"]["version"])


def test_worker_user(report):
    name, _, uid, gid, *_ = run("getent", "passwd", "sealbox-worker").split(":")
    assert report["worker_user"] == {"name": name, "exists": True, "uid": int(uid), "gid": int(gid)}


def test_user_namespaces(report):
    ns = report["namespaces"]
    assert ns["max_user_namespaces"] == int(pathlib.Path("/proc/sys/user/max_user_namespaces").read_text())
    assert ns["tried_as_uid"] == report["worker_user"]["uid"]
    # Independently: bubblewrap as the worker uid creates a user namespace.
    uid, gid = report["worker_user"]["uid"], report["worker_user"]["gid"]
    bwrap = subprocess.run(["/usr/bin/bwrap", "--unshare-user", "--ro-bind", "/", "/", "/bin/true"],
                           user=uid, group=gid, extra_groups=[], capture_output=True, timeout=30)
    assert (bwrap.returncode == 0) == ns["user_namespaces"] is True


def test_seccomp(report):
    sc = report["seccomp"]
    assert sc["available"] is True
    assert run("dpkg-query", "-W", "-f", "${Version}", "libseccomp2").startswith(sc["libseccomp"] + "-")
    actions = pathlib.Path("/proc/sys/kernel/seccomp/actions_avail").read_text().split()
    assert "kill_process" in actions and " ".join(actions) in sc["detail"]


def test_landlock(report):
    assert report["landlock"] == {"abi": 7}


def test_cgroups(report):
    cg = report["cgroups"]
    v2_mount = run("findmnt", "-n", "-t", "cgroup2", "-o", "TARGET")
    assert cg["v2_mount"] == v2_mount == "/sys/fs/cgroup/unified"
    assert cg["v2_controllers"] == pathlib.Path(v2_mount, "cgroup.controllers").read_text().split()
    assert "memory" not in cg["v2_controllers"] and "pids" not in cg["v2_controllers"]
    for controller in ("memory", "pids"):
        mount = run("findmnt", "-n", "-t", "cgroup", "-O", controller, "-o", "TARGET")
        assert cg["v1_mounts"][controller] == mount
        assert cg[controller] == "v1"
    assert cg["version"] == "hybrid"
    assert cg["memsw"] is os.path.exists("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes") is True
    assert cg["cgroup_kill"] is True and cg["usable"] is True


def test_layers_and_text(report):
    assert report["layers"] == {"namespaces": True, "worker_uid": True, "seccomp": True, "landlock": True,
                                "cgroups": True, "rlimits": True}
    text = hostcheck.format_report(report)
    assert f"bubblewrap:  /usr/bin/bwrap (version {report['bubblewrap']['version']})" in text
    assert "landlock:    ABI 7\n" in text
    assert f"worker uid:  sealbox-worker: uid {report['worker_user']['uid']}" in text
    assert "cgroups:     hybrid; memory limit via v1, pids limit via v1; memory+swap limit yes; cgroup.kill yes" in text
    for layer in report["layers"]:
        assert f"  ok   {layer}\n" in text
    assert "MISSING" not in text


def test_a_missing_worker_user_is_reported():
    report = hostcheck.host_report(worker_user="sealbox-no-such-user")
    assert report["worker_user"] == {"name": "sealbox-no-such-user", "exists": False, "uid": None, "gid": None}
    assert report["layers"]["worker_uid"] is False
    assert report["namespaces"]["tried_as_uid"] == 65534   # still measured, as nobody
    text = hostcheck.format_report(report)
    assert "sealbox-no-such-user: does not exist" in text
    assert "  MISSING worker_uid\n" in text


@pytest.mark.skipif(not os.path.exists(SEALBOX), reason="the sealbox command is not installed in this venv")
def test_cli_prints_the_same_report(report):
    out = json.loads(run(SEALBOX, "sandbox", "check", "--json"))
    assert out == json.loads(json.dumps(report))
    assert run(SEALBOX, "sandbox", "check") == hostcheck.format_report(report).strip()
