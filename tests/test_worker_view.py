"""What a compromised deserializer sees from inside a real worker sandbox."""
import json
import pathlib
import pwd
import socket
import subprocess

from conftest import PYTHON, REPO

SEALBOX = str(pathlib.Path(PYTHON).with_name("sealbox"))


def test_inside_a_worker(tmp_path):
    config = tmp_path / "sealboxd.toml"
    config.write_text("[server]\n")
    with socket.socket() as listener:  # a host service the worker must not reach
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = subprocess.run([SEALBOX, "sandbox", "run-python", str(REPO / "tests" / "worker_view_probe.py"),
                                 str(config), str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    worker_uid = pwd.getpwnam("sealbox-worker").pw_uid
    assert report["uid"] == report["euid"] == worker_uid != 0
    assert report["interfaces"] == ["lo"]
    assert report["lo_up"] is False and report["lo_state"] == "down"
    assert report["read_shadow"] == "FileNotFoundError:No such file or directory"   # /etc is not in the view
    assert report["read_config"].startswith(("FileNotFoundError", "PermissionError"))
    for key in ("write_usr", "write_venv", "write_root"):
        assert report[key].startswith(("OSError:Read-only file system", "PermissionError")), (key, report[key])
    assert report["write_socket_dir"] == "allowed"
    assert report["write_tmp"] == "allowed"
    assert report["tcp_connect"].startswith(("OSError:Network is unreachable", "PermissionError",
                                             "ConnectionRefusedError"))
