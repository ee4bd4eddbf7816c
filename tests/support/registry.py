"""A real OCI registry for the transfer tests: Debian's docker-registry (distribution 2.8) on a free
loopback port with TLS from a test CA, and pushing through the `oras` Python SDK."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .https import free_port, make_ca, make_server_cert

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


class Registry:
    def __init__(self, directory: Path):
        if not os.path.exists(REGISTRY):
            pytest.skip("docker-registry is not installed (dev.sh installs Debian's docker-registry)")
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.ca, ca_key, ca_cert = make_ca(directory, "registry-ca")
        cert, key = make_server_cert(directory, ca_key, ca_cert)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = directory / "config.yml"
        config.write_text(f"""version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {directory / "data"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{self.port}
  tls:
    certificate: {cert}
    key: {key}
""")
        self.log = open(directory / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry did not start: {(directory / 'registry.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("docker-registry did not listen")

    def client(self):
        import oras.client
        return oras.client.OrasClient(hostname=self.host, tls_verify=str(self.ca))

    def push(self, model_dir: Path, ref: str, skip: tuple[str, ...] = ()) -> str:
        """Pushes every file of model_dir as a layer titled by its relative path; returns the manifest
        digest the registry reports for `ref` (oras re-serialises the manifest: ask the registry)."""
        names = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                       if p.is_file() and p.relative_to(model_dir).as_posix() not in skip)
        # oras titles a layer by its base name; an annotation file gives nested files their path (ORAS's
        # own CLI titles them so too).
        annotations = self.dir / f"annotations-{os.getpid()}-{time.monotonic_ns()}.json"
        annotations.write_text(json.dumps({n: {"org.opencontainers.image.title": n} for n in names}))
        cwd = os.getcwd()
        os.chdir(model_dir)
        try:
            self.client().push(target=f"{self.host}/{ref}", files=names, disable_path_validation=True, quiet=True,
                               annotation_file=str(annotations))
        finally:
            os.chdir(cwd)
        return self.digest(ref)

    def _http(self):
        import urllib3
        return urllib3.PoolManager(ca_certs=str(self.ca), cert_reqs="CERT_REQUIRED")

    def digest(self, ref: str) -> str:
        repo, _, tag = ref.rpartition(":")
        r = self._http().request("HEAD", f"https://{self.host}/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        return r.headers["Docker-Content-Digest"]

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> None:
        r = self._http().request("PUT", f"https://{self.host}/v2/{repo}/manifests/{ref}", body=body,
                                 headers={"Content-Type": media_type})
        assert r.status == 201, (r.status, r.data)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
