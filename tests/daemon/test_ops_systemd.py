"""The systemd packaging: the unit passes `systemd-analyze verify`, sysusers/tmpfiles do what they say,
the alert rules name real metrics, and the daemon starts and serves under an approximation of the
unit's hardening (mount namespace with the unit's read-only and writable paths, no_new_privs, the
unit's capability bounding set). Real systemd as PID 1 is not available here: SECURITY.md lists what
was never run under it."""
from __future__ import annotations

import inspect
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest

from sealbox.daemon.config import ServerConfig, WorkerConfig
from sealbox.sandbox.profile import SandboxProfile
from tests.support import PYTHON, REPO

PACKAGING = REPO / "packaging"
UNIT = PACKAGING / "systemd" / "sealboxd.service"
SEALBOXD = str(pathlib.Path(PYTHON).with_name("sealboxd"))


def unit_settings(path: pathlib.Path = UNIT) -> dict[str, list[str]]:
    """[Service] key -> every value given (in order), comments dropped."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def local_unit(tmp_path: pathlib.Path, extra: str = "") -> pathlib.Path:
    """The shipped unit with this test environment's sealboxd (verify checks that ExecStart exists)."""
    text = UNIT.read_text().replace("/opt/sealbox/venv/bin/sealboxd", SEALBOXD)
    if extra:
        text = text.replace("[Install]", extra + "\n[Install]")
    path = tmp_path / "sealboxd.service"
    path.write_text(text)
    return path


def analyze(path: pathlib.Path) -> subprocess.CompletedProcess:
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: dev.sh setup installs Debian's systemd package")
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=120)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    result = analyze(local_unit(tmp_path))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_verify_would_catch_a_mistake(tmp_path):
    """The check above is not vacuous: an unknown directive is reported."""
    result = analyze(local_unit(tmp_path, extra="ProtectEverything=yes"))
    assert "Unknown key" in result.stderr and "ProtectEverything" in result.stderr


def test_unit_settings_the_daemon_relies_on():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["Delegate"] == ["yes"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    for absent in ("ProtectKernelTunables", "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces",
                   "PrivateUsers", "MemoryDenyWriteExecute", "SystemCallFilter", "User", "DynamicUser"):
        assert absent not in s, f"{absent} breaks workers or cgroups (SECURITY.md)"
    # The daemon's default paths ([server] in daemon/config.py) are all writable under the unit.
    writable = writable_paths(s)
    d = ServerConfig()
    for path in (d.socket, d.run_dir, d.state_dir, d.audit_log):
        assert any(path == w or path.startswith(w + "/") for w in writable), path


def writable_paths(s: dict[str, list[str]]) -> list[str]:
    paths = [p for v in s.get("ReadWritePaths", []) for p in v.split()]
    for key, root in (("RuntimeDirectory", "/run"), ("StateDirectory", "/var/lib"), ("LogsDirectory", "/var/log")):
        paths += [f"{root}/{d}" for v in s.get(key, []) for d in v.split()]
    return sorted(set(paths))


def test_sysusers_creates_the_worker_and_fetch_users(tmp_path):
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(PACKAGING / "systemd" / "sealbox.sysusers")],
                   check=True, capture_output=True, timeout=60)
    entries = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    # The names the code runs them as (config's worker user, the fetch helper's profile)
    fetch_user = inspect.signature(SandboxProfile.for_fetch_helper).parameters["user"].default
    for name in (WorkerConfig.user, fetch_user):
        entry = entries[name]
        assert 0 < int(entry[2]) < 1000 and entry[6] == "/usr/sbin/nologin", entry
    assert entries[WorkerConfig.user][2] != entries[fetch_user][2]   # two uids: neither can touch the other


def test_tmpfiles_creates_the_directories(tmp_path):
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}",
                    str(PACKAGING / "systemd" / "sealbox.tmpfiles")], check=True, capture_output=True, timeout=60)
    modes = {p: oct((tmp_path / p.lstrip("/")).stat().st_mode & 0o777)
             for p in ("/run/sealbox", "/run/sealbox/workers", "/var/lib/sealbox", "/var/log/sealbox")}
    assert modes == {"/run/sealbox": "0o755", "/run/sealbox/workers": "0o711", "/var/lib/sealbox": "0o700",
                     "/var/log/sealbox": "0o750"}
    s = unit_settings()  # the unit's own directory modes agree with tmpfiles
    assert s["RuntimeDirectoryMode"] == ["0755"] and s["StateDirectoryMode"] == ["0700"]
    assert s["LogsDirectoryMode"] == ["0750"]


def test_alert_rules_name_metrics_the_daemon_exports():
    if not os.path.exists("/usr/bin/python3") or subprocess.run(["/usr/bin/python3", "-c", "import yaml"]).returncode:
        pytest.skip("Debian's python3-yaml is not installed")
    loaded = subprocess.run(["/usr/bin/python3", "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load("
                             "open(sys.argv[1]))))", str(PACKAGING / "prometheus" / "sealbox-alerts.yml")],
                            capture_output=True, text=True, check=True)
    rules = [r for g in json.loads(loaded.stdout)["groups"] for r in g["rules"]]
    from sealbox.daemon.metrics import Metrics
    m = Metrics()

    class Cgroup:
        def memory_usage(self):
            return 1

        def memory_limit(self):
            return 2
    m.watch(lambda: [("m", "READY")], lambda: [("m", "1", Cgroup())])
    m.worker_death("m", "oom"), m.worker_restart("m"), m.verification("m", "all", "accepted")
    exported = {line.split("{")[0].split(" ")[0] for line in m.exposition().decode().splitlines()
                if line and not line.startswith("#")}
    import re
    for rule in rules:
        assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
        names = set(re.findall(r"\b(sealbox_[a-z_]+)", rule["expr"]))
        assert names <= exported, (rule["alert"], names - exported)
    assert {"SealboxVerificationRefused", "SealboxWorkerDied", "SealboxWorkerRestartLoop",
            "SealboxModelUnavailable"} <= {r["alert"] for r in rules}


# -- the daemon under an approximation of the unit's hardening

def hardening_script(s: dict[str, list[str]], writable: list[str], proc_sys_readonly: bool = False) -> str:
    """A shell script (run under `unshare --mount --uts`) that rebuilds what the unit asks for with
    mount namespaces, then execs the daemon with no_new_privs and the unit's capability bounding set."""
    caps = [c.lower().removeprefix("cap_") for v in s["CapabilityBoundingSet"] for c in v.split()]
    lines = ["set -eu", "mount --make-rprivate /"]
    if s.get("PrivateDevices") == ["yes"]:  # a minimal /dev with the pseudo devices only
        lines += [
            'stage=$(mktemp -d /run/sealbox-ops-dev.XXXXXX)',
            'mount -t tmpfs -o mode=755,nosuid,noexec tmpfs "$stage"',
            'for n in null zero full random urandom tty; do touch "$stage/$n"; mount --bind "/dev/$n" "$stage/$n"; done',
            'mkdir "$stage/pts" "$stage/shm"; mount --bind /dev/pts "$stage/pts"; ln -s pts/ptmx "$stage/ptmx"',
            'mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$stage/shm"',
            'ln -s /proc/self/fd "$stage/fd"',
            'mount --move "$stage" /dev; rmdir "$stage"',
        ]
    if s.get("ProtectSystem") == ["strict"]:  # every mount read-only except the API file systems
        lines += [
            "awk '{print $5}' /proc/self/mountinfo | while read -r mp; do",
            '  case "$mp" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|*\\\\*) continue;; esac',
            '  mount -o remount,bind,ro "$mp" 2>/dev/null || true',
            "done",
        ]
    for path in writable:  # ReadWritePaths= and the *Directory= settings
        lines += [f"mount --bind {shlex.quote(path)} {shlex.quote(path)}",
                  f"mount -o remount,bind,rw {shlex.quote(path)}"]
    if s.get("PrivateTmp") == ["yes"]:
        lines += ["mount -t tmpfs -o mode=1777 tmpfs /tmp", "mount -t tmpfs -o mode=1777 tmpfs /var/tmp"]
    if s.get("ProtectHome") == ["yes"]:
        lines += [f"[ -d {d} ] && mount -t tmpfs -o ro,mode=755 tmpfs {d}" for d in ("/home", "/root")]
    if proc_sys_readonly:  # what ProtectKernelTunables would add
        lines += ["mount --bind /proc/sys /proc/sys", "mount -o remount,bind,ro /proc/sys"]
    # The approximation must hold: outside the writable paths nothing can be written.
    lines += ['for probe in /opt /usr /etc /srv /var/lib; do',
              '  if touch "$probe/.sealbox-rw-probe" 2>/dev/null; then rm -f "$probe/.sealbox-rw-probe";'
              ' echo "approximation broken: $probe is writable" >&2; exit 97; fi',
              "done"]
    no_new_privs = ["--no-new-privs"] if s.get("NoNewPrivileges") == ["yes"] else []
    lines.append("exec setpriv " + " ".join(no_new_privs) + " --bounding-set=-all," + ",".join("+" + c for c in caps)
                 + ' "$@"')
    return "\n".join(lines)


@pytest.fixture
def hardened(demo_model, keys):
    """Config, model and key under /srv (read-only in the namespace; PrivateTmp hides /tmp), the
    daemon's socket, state and audit log in subdirectories of the unit's writable directories."""
    tag = f"ops-test-{uuid.uuid4().hex[:10]}"
    srv = pathlib.Path("/srv") / f"sealbox-{tag}"
    made_parents = [p for p in ("/srv", "/run/sealbox", "/var/lib/sealbox", "/var/log/sealbox") if not os.path.exists(p)]
    run, state, logs = (pathlib.Path(p) / tag for p in ("/run/sealbox", "/var/lib/sealbox", "/var/log/sealbox"))
    for d in (srv / "models", run, state, logs):
        d.mkdir(parents=True, mode=0o755)
    os.chmod(state, 0o700)  # the version store refuses anything else
    os.chmod("/run/sealbox", 0o755)
    shutil.copytree(demo_model, srv / "models" / "demo")
    shutil.copy2(keys[1], srv / "publisher.pub")
    config = srv / "sealboxd.toml"
    config.write_text(f"""[server]
socket = "{run}/sealbox.sock"
run_dir = "{run}/workers"
state_dir = "{state}"
audit_log = "{logs}/audit.jsonl"
[workers]
python = "{PYTHON}"
load_timeout_s = 60
[policy]
sources = ["{srv}/models"]
public_keys = ["{srv}/publisher.pub"]
[models.demo]
path = "{srv}/models/demo"
""")
    yield {"config": config, "socket": f"{run}/sealbox.sock", "audit": logs / "audit.jsonl", "state": state}
    for d in (srv, run, state, logs):
        shutil.rmtree(d, ignore_errors=True)
    for p in reversed(made_parents):
        shutil.rmtree(p, ignore_errors=True)


def start_hardened(hardened, stderr_path, proc_sys_readonly=False, argv=()) -> subprocess.Popen:
    s = unit_settings()
    script = hardening_script(s, writable_paths(s), proc_sys_readonly)
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(
            ["unshare", "--mount", "--uts", "--propagation", "private", "/bin/sh", "-c", script, "sh",
             SEALBOXD, "--config", str(hardened["config"]), *argv],
            stdout=subprocess.DEVNULL, stderr=err, cwd="/")


def wait_ready(proc, socket_path, stderr_path, timeout=120.0):
    from sealbox.client import Client
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sealboxd exited {proc.returncode}: {stderr_path.read_text()}")
        if os.path.exists(socket_path):
            try:
                with Client(f"unix:{socket_path}", timeout=5) as client:
                    # Ready, or (strict readiness: not ready while a model is not READY) every initial
                    # load has its outcome.
                    if client.ready() or (client.live() and all(m.state in ("READY", "UNAVAILABLE")
                                                                for m in client.models())):
                        return
            except Exception:
                pass
        time.sleep(0.2)
    raise AssertionError(f"sealboxd not ready: {stderr_path.read_text()}")


def stop(proc) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def test_daemon_serves_under_the_units_hardening(hardened, tmp_path):
    from sealbox.client import Client
    stderr_path = tmp_path / "stderr"
    proc = start_hardened(hardened, stderr_path)
    try:
        wait_ready(proc, hardened["socket"], stderr_path)
        status = open(f"/proc/{proc.pid}/status").read()
        assert "NoNewPrivs:\t1" in status  # it is the daemon itself, under no_new_privs
        with Client(f"unix:{hardened['socket']}", timeout=30) as client:
            assert client.status("demo").state == "READY", client.status("demo").reason
            y = client.infer("demo", {"x": np.ones((2, 4), np.float32)})["y"]
            assert y.shape == (2, 3)
    finally:
        assert stop(proc) == 0, stderr_path.read_text()
    events = [json.loads(line)["event"] for line in hardened["audit"].read_text().splitlines()]
    assert events[0] == "daemon_start" and "model_load" in events and events[-1] == "daemon_stop"


def test_protect_kernel_tunables_would_break_workers(hardened, tmp_path):
    """Why the unit leaves ProtectKernelTunables= off: with /proc/sys overmounted read-only, the
    kernel refuses the fresh /proc that bubblewrap mounts for the worker, and no model loads."""
    from sealbox.client import Client
    stderr_path = tmp_path / "stderr"
    proc = start_hardened(hardened, stderr_path, proc_sys_readonly=True, argv=["--verbose"])
    try:
        wait_ready(proc, hardened["socket"], stderr_path)
        with Client(f"unix:{hardened['socket']}", timeout=30) as client:
            status = client.status("demo")
        assert status.state == "UNAVAILABLE", status
    finally:
        stop(proc)
    worker_lines = [line for line in stderr_path.read_text().splitlines() if "worker demo:" in line]
    assert any("bwrap" in line and "proc" in line for line in worker_lines), worker_lines
