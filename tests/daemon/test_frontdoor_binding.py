"""Binding: IP literals only, every configured address binds or the daemon refuses to start, no SO_REUSEPORT.

Before: with tcp = "localhost:PORT", an unprivileged user who bound [::1]:PORT first received the
clients' requests while sealboxd started with a gRPC warning; two sealboxd on one port both listened.
"""
from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.support import PYTHON
from tests.support.frontdoor import caller_user  # noqa: F401 (fixture)

SQUATTER = r"""
import json, socket, sys
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)   # what a squatter would do to share the port
s.bind((sys.argv[2], 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
sys.stdin.read()   # hold the port until the test closes stdin
"""


@pytest.mark.parametrize("family, host", [("6", "::1"), ("4", "127.0.0.1")])
def test_squatter_on_the_port_makes_the_daemon_refuse_to_start(daemon_factory, demo_model, keys, caller_user,
                                                                family, host):
    squatter = subprocess.Popen([PYTHON, "-c", SQUATTER, family, host], user=caller_user["uid"],
                                group=caller_user["gid"], extra_groups=[], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        port = int(squatter.stdout.readline())
        address = f"[{host}]:{port}" if family == "6" else f"{host}:{port}"
        daemon = daemon_factory({"demo": {"path": demo_model, "load": False}}, keys[1],
                                server=f'tcp = "{address}"')
        result = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(daemon.config)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert result.stderr.strip().endswith(f"sealboxd: {address}: address in use or not bindable")
        assert not os.path.exists(daemon.socket) and not os.path.exists(daemon.admin_socket)   # nothing served
    finally:
        squatter.stdin.close()
        squatter.wait(timeout=10)


def test_second_daemon_on_the_same_tcp_port_refuses_to_start(daemon_factory, demo_model, keys):
    first = daemon_factory({"demo": {"path": demo_model}}, keys[1], tcp=True).start()
    second = daemon_factory({"demo": {"path": demo_model, "load": False}}, keys[1],
                            server=f'tcp = "{first.tcp_target}"')
    result = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(second.config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"sealboxd: {first.tcp_target}: address in use or not bindable")
    assert not os.path.exists(second.socket)
    import numpy as np
    from sealbox.client import Client
    with Client(first.tcp_target, timeout=10) as c:   # the first one alone serves, untouched
        assert c.infer("demo", {"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 3)
    with first.client() as c:
        assert c.model_ready("demo")


def test_second_daemon_on_a_live_admin_socket_refuses_and_removes_nothing(daemon_factory, demo_model, keys):
    first = daemon_factory({"demo": {"path": demo_model}}, keys[1]).start()
    second = daemon_factory({"demo": {"path": demo_model, "load": False}}, keys[1],
                            server=f'admin_socket = "{first.admin_socket}"')
    second.config.write_text(second.config.read_text().replace(f'admin_socket = "{second.admin_socket}"\n', ""))
    result = subprocess.run([PYTHON, "-m", "sealbox.daemon.main", "--config", str(second.config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"sealboxd: {first.admin_socket}: another daemon is listening there")
    assert os.path.exists(first.socket) and os.path.exists(first.admin_socket)
    with first.admin_client() as c:
        assert c.models()[0].state == "READY"


def test_tcp_listener_has_no_reuseport(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model, "load": False}}, keys[1], tcp=True).start()
    host, port = daemon.tcp_target.rsplit(":", 1)
    with socket.socket(socket.AF_INET) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError):
            other.bind((host, int(port)))
