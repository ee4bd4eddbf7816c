"""A real sealboxd in a subprocess, for tests and benchmarks alike."""
from __future__ import annotations

import pathlib
import shutil
import signal
import subprocess
import time
import uuid

import psutil

from . import PYTHON, RUN_ROOT


class Daemon:
    """A real sealboxd subprocess on a Unix socket and its admin socket (and optionally loopback TCP).

    `server` adds lines to [server]; `socket_dir` puts both sockets elsewhere (e.g. a directory
    other users can reach)."""

    def __init__(self, directory: pathlib.Path, models: dict[str, dict], public_key: pathlib.Path,
                 workers: str = "", tcp: bool = False, extra: str = "", server: str = "", socket_dir=None):
        self.dir = directory
        self.models = models
        self.run_dir = f"{RUN_ROOT}/{uuid.uuid4().hex[:12]}"
        sockets = pathlib.Path(socket_dir or directory)
        self.socket = str(sockets / "sealbox.sock")
        self.target = f"unix:{self.socket}"
        self.admin_socket = str(sockets / "admin.sock")
        self.admin_target = f"unix:{self.admin_socket}"
        self.audit_log = directory / "audit.jsonl"
        self.tcp_target = None
        lines = ["[server]", f'socket = "{self.socket}"', f'admin_socket = "{self.admin_socket}"',
                 f'run_dir = "{self.run_dir}"', f'state_dir = "{directory / "state"}"',
                 f'audit_log = "{self.audit_log}"', server]
        if tcp:
            import socket as s
            with s.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            self.tcp_target = f"127.0.0.1:{port}"
            lines.append(f'tcp = "{self.tcp_target}"')
        default_python = [] if "python =" in workers else [f'python = "{PYTHON}"']
        lines += ["[workers]", *default_python, "load_timeout_s = 60", "restart_backoff_s = [0.2, 2]", workers]
        # A fetched model ("source": an https:// URL) is allowed by its URL's parent prefix.
        sources = sorted({str(pathlib.Path(m["path"]).parent) for m in models.values() if "path" in m}
                         | {m["source"].rstrip("/").rsplit("/", 1)[0] + "/" for m in models.values() if "source" in m})
        lines += ["[policy]", f"sources = {sources!r}".replace("'", '"'),
                  f'public_keys = ["{public_key}"]']
        for name, model in models.items():
            where = f'source = "{model["source"]}"' if "source" in model else f'path = "{model["path"]}"'
            lines += [f"[models.{name}]", where, f'format = "{model.get("format", "mlx")}"']
            if model.get("load") is False:
                lines.append("load = false")
            if model.get("options"):
                lines.append(model["options"])
            if model.get("policy"):
                lines += [f"[models.{name}.policy]", model["policy"]]
        lines.append(extra)
        self.config = directory / "sealboxd.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.stderr_path = directory / "sealboxd.stderr"
        self.proc = None

    def start(self, wait: bool = True) -> "Daemon":
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([PYTHON, "-m", "sealbox.daemon.main", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr, cwd="/")
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until every initial load has an outcome: ServerReady, or (strict readiness: not ready while
        a load = true model is not READY) every load = true model READY or UNAVAILABLE."""
        from sealbox.client import Client
        deadline = time.monotonic() + timeout
        initial = {name for name, model in self.models.items() if model.get("load") is not False}
        with Client(self.target, timeout=5, admin_target=self.admin_target) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sealboxd exited {self.proc.returncode}: {self.stderr_path.read_text()}")
                try:
                    if client.ready():
                        return
                    states = {m.name: m.state for m in client.models()}
                    if client.live() and all(states.get(n) in ("READY", "UNAVAILABLE") for n in initial):
                        return
                except Exception:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"sealboxd not ready: {self.stderr_path.read_text()}")

    def client(self):
        """Inference and metadata over the inference socket; models/load/unload over the admin socket."""
        from sealbox.client import Client
        return Client(self.target, timeout=30, admin_target=self.admin_target)

    def admin_client(self):
        """Every call over the admin socket (root-only)."""
        from sealbox.client import Client
        return Client(self.admin_target, timeout=30, admin_target=self.admin_target)

    def worker_pids(self) -> list[int]:
        """Host pids of the bwrap processes (and their sandboxed children) below this daemon."""
        return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]

    def audit_events(self) -> list[dict]:
        import json
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip()]

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "stderr", None):
            self.stderr.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.proc.returncode if self.proc else 0
