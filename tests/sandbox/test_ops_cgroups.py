"""A delegated cgroup v2 subtree: the daemon moves itself into <own>/supervisor, enables controllers
in <own>/cgroup.subtree_control, and worker groups go to <own>/sealbox/<name>, beside it.

Run here on a real cgroup2 mount in a scratch cgroup made for the test. On this hybrid development
host memory and pids are bound to cgroup v1, so the controller enabled is one the v2 hierarchy does
offer (hugetlb here): the no-internal-process rule that makes the move necessary is the same for
every domain controller. What was never run (systemd's Delegate=yes on a pure v2 host): SECURITY.md."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from tests.support import PYTHON
from sealbox.sandbox import cgroups

CHILD = r"""
import errno, json, os, sys
from sealbox.sandbox import cgroups
scratch, controller, mount = sys.argv[1:4]
with open(os.path.join(scratch, "cgroup.procs"), "w") as f:
    f.write("0")                                  # the "daemon" starts in its own (delegated) cgroup
out = {"own_before": cgroups._own_cgroups()[0]}
try:                                              # what fails without the move: no internal processes
    cgroups._write(os.path.join(scratch, "cgroup.subtree_control"), "+" + controller)
    out["direct"] = "enabled"
except OSError as exc:
    out["direct"] = errno.errorcode[exc.errno]
try:
    out["first"] = cgroups.prepare_delegated_subtree([controller], mount)
    out["second"] = cgroups.prepare_delegated_subtree([controller], mount)
except cgroups.CgroupError as exc:
    out["error"] = str(exc)
out["own_after"] = cgroups._own_cgroups()[0]
if "error" not in out and sys.argv[4] == "worker":
    group = cgroups.WorkerCgroup.create("ops-test-worker", 64 * 2**20, 16)
    out["worker_v2"] = group.v2_dir
    group.remove()
print(json.dumps(out))
"""


@pytest.fixture
def scratch_v2():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    support = cgroups.cgroup_support()
    mount = support["v2_mount"]
    if not mount:
        pytest.skip("no cgroup2 mount")
    root_controllers = open(os.path.join(mount, "cgroup.controllers")).read().split()
    candidates = [c for c in ("hugetlb", "pids", "memory", "io", "cpu") if c in root_controllers]
    if not candidates:
        pytest.skip(f"the cgroup2 mount {mount} offers no domain controller to enable")
    controller = candidates[0]
    subtree = os.path.join(mount, "cgroup.subtree_control")
    was_enabled = controller in open(subtree).read().split()
    if not was_enabled:
        cgroups._write(subtree, "+" + controller)
    scratch = os.path.join(mount, f"sealbox-ops-test-{uuid.uuid4().hex[:10]}")
    os.mkdir(scratch)
    yield mount, scratch, controller
    for sub in ("sealbox", cgroups.LEAF_DIR, ""):
        path = os.path.join(scratch, sub) if sub else scratch
        for child in (os.listdir(path) if os.path.isdir(path) else []):
            if os.path.isdir(os.path.join(path, child)):
                os.rmdir(os.path.join(path, child))
        if os.path.isdir(path):
            os.rmdir(path)
    if not was_enabled:
        try:
            cgroups._write(subtree, "-" + controller)
        except OSError:
            pass  # another cgroup enabled it below the root meanwhile


def run_child(mount, scratch, controller, mode="worker") -> dict:
    result = subprocess.run([PYTHON, "-c", CHILD, scratch, controller, mount, mode],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_daemon_moves_into_a_leaf_and_workers_go_beside_it(scratch_v2):
    mount, scratch, controller = scratch_v2
    rel = "/" + os.path.relpath(scratch, mount)
    out = run_child(mount, scratch, controller)
    assert out["own_before"] == rel
    assert out["direct"] == "EBUSY"  # the problem the move solves
    assert out["first"] == {"base": rel, "moved": True, "delegated": False}
    assert out["second"] == {"base": rel, "moved": False, "delegated": False}  # idempotent
    assert out["own_after"] == f"{rel}/{cgroups.LEAF_DIR}"
    assert controller in open(os.path.join(scratch, "cgroup.subtree_control")).read().split()
    if cgroups.cgroup_support()["cgroup_kill"]:
        assert out["worker_v2"] == os.path.join(scratch, cgroups.GROUP_DIR, "ops-test-worker")


def test_delegation_marker_is_reported(scratch_v2):
    mount, scratch, controller = scratch_v2
    try:
        os.setxattr(scratch, "trusted.delegate", b"1")  # what systemd >= 251 sets for Delegate=yes
    except OSError as exc:
        pytest.skip(f"cannot set trusted.delegate here: {os.strerror(exc.errno)}")
    out = run_child(mount, scratch, controller, mode="prepare")
    assert out["first"]["moved"] is True and out["first"]["delegated"] is True


def test_never_moves_other_processes(scratch_v2):
    mount, scratch, controller = scratch_v2
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with open(os.path.join(scratch, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        out = run_child(mount, scratch, controller, mode="prepare")
        assert "also holds processes" in out["error"] and "Delegate=yes" in out["error"]
        assert not os.path.exists(os.path.join(scratch, cgroups.LEAF_DIR))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_nothing_happens_in_the_root_cgroup_or_without_v2_controllers():
    own = cgroups._own_cgroups()[0]
    support = cgroups.cgroup_support()
    if own == "/" or not [c for c in ("memory", "pids") if support[c] == "v2"]:
        # This test process: root cgroup, or a hybrid host where v2 supplies neither controller.
        result = cgroups.prepare_delegated_subtree()
        assert result["moved"] is False and result["base"] == own
    else:
        pytest.skip("this test process sits in a non-root cgroup of a pure v2 host")
