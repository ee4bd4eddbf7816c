"""Run inside a worker sandbox by test_worker_view.py: report what the worker can see and do."""
import json
import os
import socket
import sys

config_path = sys.argv[1]
report = {"uid": os.getuid(), "euid": os.geteuid()}
report["interfaces"] = sorted(name for _, name in socket.if_nameindex())
with open("/sys/class/net/lo/operstate") as f:
    report["lo_state"] = f.read().strip()
try:
    with open("/sys/class/net/lo/flags") as f:
        report["lo_up"] = bool(int(f.read(), 16) & 1)
except OSError as exc:
    report["lo_up"] = f"error: {exc}"


def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return exc.__class__.__name__ + ":" + (exc.strerror or "")


report["read_shadow"] = attempt(lambda: open("/etc/shadow").read())
report["read_config"] = attempt(lambda: open(config_path).read())
report["write_usr"] = attempt(lambda: open("/usr/sealbox-escape", "w").write("x"))
report["write_venv"] = attempt(lambda: open(os.path.join(sys.prefix, "escape"), "w").write("x"))
report["write_root"] = attempt(lambda: open("/escape", "w").write("x"))
report["write_socket_dir"] = attempt(lambda: open("/run/sealbox/probe", "w").write("x"))
report["write_tmp"] = attempt(lambda: open("/tmp/probe", "w").write("x"))
report["tcp_connect"] = attempt(lambda: socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=2))
print(json.dumps(report))
