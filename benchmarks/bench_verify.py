"""Model verification throughput: sealbox verify vs single-threaded hashlib vs model_signing.

    /opt/sealbox/venv/bin/python -m benchmarks.bench_verify [--mib 1024] [--files 4] [--repeat 5]   (from the repository root)

(or SEALBOX_BENCH_MIB=256). Creates a model of FILES random files totalling
MIB MiB in a temporary directory, signs it with a key, warms the page cache,
then times each way of checking it and prints medians, GB/s and ratios
against single-threaded hashlib.sha256 measured in the same run.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sealbox.client import publisher
from sealbox.daemon.config import policy_from_toml
from sealbox.trust import verify_model
from sealbox.trust._hashing import hash_into_memfds
from sealbox.trust._storage import open_tree

MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


def timed(fn, repeat: int) -> float:
    """Median wall time of fn(); a callable it returns (freeing the memfds,
    which the daemon does only when the model is unloaded) runs off the clock."""
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        cleanup = fn()
        samples.append(time.perf_counter() - t)
        if callable(cleanup):
            cleanup()
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=int(os.environ.get("SEALBOX_BENCH_MIB", "1024")))
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sealbox-bench-verify-"))
    try:
        model = tmp / "model"
        model.mkdir(mode=0o755)
        per_file = (args.mib << 20) // args.files
        for i in range(args.files):
            with open(model / f"model-{i:05d}.safetensors", "wb") as f:
                for _ in range(0, per_file, 16 << 20):
                    f.write(os.urandom(min(16 << 20, per_file)))
                f.truncate(per_file)
            os.chmod(model / f"model-{i:05d}.safetensors", 0o644)
        key = ec.generate_private_key(ec.SECP256R1())
        (tmp / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        (tmp / "k.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
        assert publisher.main(["sign", "key", str(model), "--private-key", str(tmp / "k.pem")]) == 0
        assert publisher.main(["sign", "key", str(model), "--private-key", str(tmp / "k.pem"), "--hash", "blake3",
                                   "--signature", str(tmp / "blake3.sig")]) == 0
        policy = policy_from_toml({"sources": [str(tmp)], "public_keys": [str(tmp / "k.pub")]}, "bench")
        policy_b3 = policy_from_toml({"sources": [str(tmp)], "public_keys": [str(tmp / "k.pub")],
                                           "signature": str(tmp / "blake3.sig")}, "bench")
        files = sorted(p for p in model.iterdir() if p.suffix == ".safetensors")
        total = sum(p.stat().st_size for p in files)
        os.sync()  # no writeback competing with the measurements
        for p in files:  # warm the page cache
            p.read_bytes()

        def baseline():
            for p in files:
                with open(p, "rb") as f:
                    hashlib.file_digest(f, "sha256")

        def sealbox_verify(pol):
            return lambda: verify_model("bench", str(model), pol, None, None).close

        def sealbox_hash_only(algorithm):
            def run():
                tree = open_tree(str(model), {"model.sig"})
                try:
                    hash_into_memfds(list(tree.files.values()), algorithm, keep=False)
                finally:
                    tree.close()
            return run

        def sealbox_seal(algorithm):
            def run():
                tree = open_tree(str(model), {"model.sig"})
                try:
                    hashed = hash_into_memfds(list(tree.files.values()), algorithm)
                finally:
                    tree.close()
                return lambda: [os.close(h.memfd) for h in hashed.values()]
            return run

        def upstream_cli():
            subprocess.run([MODEL_SIGNING, "verify", "key", str(model), "--signature", str(model / "model.sig"),
                            "--public_key", str(tmp / "k.pub")], check=True, capture_output=True)

        def upstream_startup():
            subprocess.run([MODEL_SIGNING, "--version"], check=True, capture_output=True)

        rows = [
            ("hashlib.sha256, 1 thread (baseline)", baseline),
            ("sealbox verify_model, sha256-signed", sealbox_verify(policy)),
            ("sealbox verify_model, blake3-signed", sealbox_verify(policy_b3)),
            ("  of which hash + copy into sealed memfds, sha256", sealbox_seal("sha256")),
            ("  hash only, no memfds, sha256 (publisher)", sealbox_hash_only("sha256")),
            ("model_signing verify key (CLI)", upstream_cli),
            ("model_signing --version (start-up only)", upstream_startup),
        ]
        print(f"model: {args.files} files, {total / 2**20:.0f} MiB, page cache warm, {os.cpu_count()} CPUs, "
              f"median of {args.repeat}")
        base = None
        for label, fn in rows:
            timed(fn, 1)  # warm-up
            t = timed(fn, args.repeat)
            base = base or t
            rate = "" if "start-up" in label else f"{total / t / 1e9:6.2f} GB/s"
            print(f"  {label:48s} {t * 1e3:9.1f} ms  {rate:>11s}  x{base / t:5.2f} vs baseline")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
