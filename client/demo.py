"""`sealbox demo`: build, sign and serve the built-in demo model, call it once.

Everything lives in one user-writable directory: the model, a demo signing
key, the daemon's config and its state. Worker socket directories live under
/run/sealbox, where the unprivileged worker user can reach them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

DEFAULT_DIR = os.path.expanduser("~/.local/share/sealbox/demo")


def _make_key(keys_dir: str) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = os.path.join(keys_dir, "demo-signer.key"), os.path.join(keys_dir, "demo-signer.pub")
    if not os.path.exists(private):
        os.makedirs(keys_dir, mode=0o700, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        with open(public, "wb") as f:
            f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def prepare(directory: str) -> str:
    """Build and sign the demo model and write the daemon's config; return the config path."""
    from . import publisher
    from .demo_model import build_demo_model

    directory = os.path.abspath(directory)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    model = os.path.join(directory, "model")
    private, public = _make_key(os.path.join(directory, "keys"))
    if not os.path.exists(os.path.join(model, "model.sig")):
        build_demo_model(model)
        code = publisher.main(["sign", "key", model, "--private-key", private])
        if code != 0:
            raise SystemExit(f"sealbox demo: signing the demo model failed (exit {code})")
    config = os.path.join(directory, "sealboxd.toml")
    q = json.dumps  # a JSON string is a valid TOML basic string: paths with quotes stay paths
    with open(config, "w") as f:
        f.write(f"""# Written by `sealbox demo`.
[server]
socket = {q(directory + "/sealbox.sock")}
state_dir = {q(directory + "/state")}
run_dir = "/run/sealbox/demo-workers"
audit_log = {q(directory + "/audit.jsonl")}
audit_stderr = false

[workers]
python = {q(sys.executable)}

[policy]
sources = [{q(directory)}]
public_keys = [{q(public)}]

[models.demo]
path = {q(model)}
format = "mlx"
""")
    return config


def run_demo(directory: str | None, once: bool = False) -> int:
    from .client import Client
    from .demo_model import INPUT, OUTPUT, SIZES

    if os.geteuid() != 0:
        print("sealbox demo: run as root: the daemon drops each worker to the sealbox-worker user", file=sys.stderr)
        return 2
    directory = os.path.abspath(directory or DEFAULT_DIR)
    config = prepare(directory)
    print(f"sealbox demo: model, key and config in {directory}")
    daemon = subprocess.Popen([sys.executable, "-m", "sealbox.daemon.main", "--config", config])
    target = f"unix:{directory}/sealbox.sock"
    try:
        with Client(target) as client:
            deadline = time.monotonic() + 60
            while True:
                if daemon.poll() is not None:
                    print(f"sealbox demo: sealboxd exited with {daemon.returncode}", file=sys.stderr)
                    return 1
                try:
                    if client.ready():
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    print("sealbox demo: sealboxd did not become ready in 60 s", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            x = np.arange(2 * SIZES[0], dtype=np.float32).reshape(2, SIZES[0]) / 4
            status = client.status("demo")
            if status.state != "READY":
                print(f"sealbox demo: model not ready: {status.state}: {status.reason}", file=sys.stderr)
                return 1
            y = client.infer("demo", {INPUT: x})[OUTPUT]
        np.save(os.path.join(directory, "x.npy"), x)
        print(f"sealbox demo: {INPUT} =\n{x}\n{OUTPUT} = demo({INPUT}) =\n{y}")
        cli = os.path.join(os.path.dirname(sys.executable), "sealbox")  # the venv's, which may not be on PATH
        print(f"\nCall it again:\n  {cli} --target {target} infer demo --input {INPUT}={directory}/x.npy\n"
              f"  {cli} --target {target} models")
        if not once:
            print("\nsealboxd is serving; Ctrl-C stops it.")
            daemon.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
