"""A real SFTP server for the transfer tests: Debian's openssh-server on a free loopback port, with a
test host key, a test user allowed public-key logins only through internal-sftp, and a debug log."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from . import RUN_ROOT
from .https import free_port

SSHD = "/usr/sbin/sshd"
USER = "sealbox-sftp-test"


def ssh_keypair(path: Path) -> tuple[Path, str]:
    """An Ed25519 key in OpenSSH format (mode 0600); returns its path and the public key line."""
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return path, public


def ensure_user() -> None:
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
    # useradd's default password field is "!" (locked): with UsePAM no, sshd then refuses even key
    # logins. "*" means "no password can match" without locking the account.
    subprocess.run(["usermod", "-p", "*", USER], check=True)


class Sshd:
    def __init__(self, directory: Path):
        if not os.path.exists(SSHD):
            pytest.skip("openssh-server is not installed (dev.sh installs it)")
        ensure_user()
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.host_key, self.host_public = ssh_keypair(directory / "host_key")
        self.client_key, client_public = ssh_keypair(directory / "client_key")
        self.port = free_port()
        self.known_hosts = directory / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_public}\n")
        # What it serves, and its authorized_keys (sshd reads them as the user), must be readable by
        # the test user (pytest's tmp_path is root's, 0700).
        os.makedirs(RUN_ROOT, mode=0o755, exist_ok=True)
        os.chmod(RUN_ROOT, 0o755)
        self.root = Path(tempfile.mkdtemp(prefix="sftp-", dir=RUN_ROOT))
        os.chmod(self.root, 0o755)
        keys = self.root / "authorized_keys"
        keys.mkdir(mode=0o755)
        (keys / USER).write_text(client_public + "\n")
        os.chmod(keys / USER, 0o644)
        self.log = directory / "sshd.log"
        config = directory / "sshd_config"
        config.write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {directory}/sshd.pid
AuthorizedKeysFile {keys}/%u
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication yes
KbdInteractiveAuthentication no
AllowUsers {USER}
Subsystem sftp internal-sftp
ForceCommand internal-sftp
LogLevel DEBUG1
""")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation directory
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sshd did not start: {self.proc.stderr.read().decode()} "
                                     f"{self.log.read_text() if self.log.exists() else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("sshd did not listen")

    def publish(self, model_dir: Path, under: str) -> str:
        target = self.root / under
        shutil.copytree(model_dir, target)
        for p in [target, *target.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        for parent in target.relative_to(self.root).parents:
            os.chmod(self.root / parent, 0o755)
        return f"sftp://{USER}@127.0.0.1:{self.port}{target}/"

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
