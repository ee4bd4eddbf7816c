"""A real HTTPS server for the transfer tests: Debian's nginx on a free loopback port, a test CA made here.

`Nginx(directory)` writes a CA and a server certificate for 127.0.0.1 and localhost, a config serving
`docroot/` over TLS with an access log of every request (method, URI, status, Range, bytes sent), and
a few special locations: /to-http/ redirects to http://, /slow/ is rate-limited after its first MiB,
/dots/X and /dotdot/X redirect to /models/%2e%2e/private/X and /models/../private/X.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(d: Path, cn: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    path = d / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(d: Path, ca_key, ca_cert, cn: str = "127.0.0.1") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = d / "server.pem", d / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, directory: Path, ca_name: str = "test-ca"):
        if not os.path.exists(NGINX):
            pytest.skip("nginx is not installed (dev.sh installs nginx-light)")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.docroot = directory / "docroot"
        self.docroot.mkdir(exist_ok=True)
        self.ca, ca_key, ca_cert = make_ca(directory, ca_name)
        cert, key = make_server_cert(directory, ca_key, ca_cert)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}/"
        self.access_log = directory / "access.log"
        conf = directory / "nginx.conf"
        conf.write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {directory}/tmp-body;
    proxy_temp_path {directory}/tmp-proxy;
    fastcgi_temp_path {directory}/tmp-fcgi;
    uwsgi_temp_path {directory}/tmp-uwsgi;
    scgi_temp_path {directory}/tmp-scgi;
    log_format t '$request_method $uri $status range=$http_range sent=$body_bytes_sent';
    access_log {self.access_log} t;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {self.docroot};
        location /to-http/ {{ rewrite ^/to-http/(.*)$ http://127.0.0.1:{self.port}/models/$1 redirect; }}
        location /moved/ {{ rewrite ^/moved/(.*)$ https://127.0.0.1:{self.port}/models/$1 redirect; }}
        location /slow/ {{ limit_rate_after 1m; limit_rate 2m; }}
        location ~ ^/dots/(.*)$ {{ return 302 https://127.0.0.1:{self.port}/models/%2e%2e/private/$1; }}
        location ~ ^/dotdot/(.*)$ {{ return 302 https://127.0.0.1:{self.port}/models/../private/$1; }}
    }}
}}
""")
        self.proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(directory)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx did not start: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("nginx did not listen")

    def publish(self, model_dir: Path, under: str) -> str:
        """Copies a (signed) model directory to docroot/UNDER/; returns its URL."""
        target = self.docroot / under
        shutil.copytree(model_dir, target, dirs_exist_ok=True)
        return self.url + under.strip("/") + "/"

    def requests(self) -> list[str]:
        """The access log's lines so far (nginx writes each when its response is done)."""
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def kill_worker(self) -> None:
        """SIGKILLs nginx's worker (its connections close mid-response; the master starts another)."""
        for child in psutil.Process(self.proc.pid).children():
            child.send_signal(signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
