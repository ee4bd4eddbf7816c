"""Run inside a worker sandbox by test_worker_view.py: report, one JSON line per check, what the worker
can see and do. Each line is flushed, so a check that gets the worker killed still leaves the earlier ones."""
import json
import os
import socket
import sys


def report(key, value):
    print(json.dumps({key: value}), flush=True)


def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return exc.__class__.__name__ + ":" + (exc.strerror or "")


config_path, port = sys.argv[1], int(sys.argv[2])
report("read_shadow", attempt(lambda: open("/etc/shadow").read()))
report("read_config", attempt(lambda: open(config_path).read()))
report("write_usr", attempt(lambda: open("/usr/sealbox-escape", "w").write("x")))
report("write_venv", attempt(lambda: open(os.path.join(sys.prefix, "escape"), "w").write("x")))
report("write_root", attempt(lambda: open("/escape", "w").write("x")))
report("write_socket_dir", attempt(lambda: open("/run/sealbox/probe", "w").write("x")))
report("write_tmp", attempt(lambda: open("/tmp/probe", "w").write("x")))
report("tcp_connect", attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=2)))
