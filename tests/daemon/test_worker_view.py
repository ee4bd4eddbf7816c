"""What a compromised deserializer sees from inside a real worker sandbox."""
import json
import pathlib
import socket
import subprocess

from tests.support import PYTHON, REPO

SEALBOX = str(pathlib.Path(PYTHON).with_name("sealbox"))


def test_inside_a_worker(tmp_path):
    config = tmp_path / "sealboxd.toml"
    config.write_text("[server]\n")
    with socket.socket() as listener:  # a host service the worker must not reach
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = subprocess.run([SEALBOX, "sandbox", "run-python", str(REPO / "tests" / "daemon" / "worker_view_probe.py"),
                                 str(config), str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = {k: v for line in result.stdout.splitlines() for k, v in json.loads(line).items()}
    # (The uid the host sees is checked from outside: test_serving.test_worker_runs_as_unprivileged_uid;
    # getuid() itself is not on the worker's syscall allowlist.)
    assert report["read_shadow"] == "FileNotFoundError:No such file or directory"   # /etc is not in the view
    assert report["read_config"] == "FileNotFoundError:No such file or directory"   # nor is the config
    for key in ("write_usr", "write_venv", "write_root"):
        assert report[key] in ("OSError:Read-only file system", "PermissionError:Permission denied"), (key, report[key])
    assert report["write_socket_dir"] == "PermissionError:Permission denied"   # Landlock: sockets only
    assert report["write_tmp"] == "allowed"
    # No IPv4 socket at all: seccomp answers socket(AF_INET) with EAFNOSUPPORT.
    assert report["tcp_connect"] == "OSError:Address family not supported by protocol"
