"""HTTPS fetch of a signed model on loopback (real nginx, test CA) against curl fetching the same files;
and the time from a daemon's start to READY for a remote model against the same model from a local path.

`python -m benchmarks.bench_fetch` from the repository root, as root (the sandboxed helper drops to
sealbox-fetch). BENCH_FETCH_MB sets the model size (default 1024, four files); medians of BENCH_REPEATS (3).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> int:
    from sealbox.client import publisher
    from sealbox.daemon.config import policy_from_toml
    from sealbox.sandbox.profile import SandboxProfile
    from sealbox.transfer.fetch import fetch_model
    from sealbox.transfer.https import HttpsTransport
    from sealbox.transfer.sandboxed import SandboxedTransport
    from sealbox.transfer.store import Store
    from tests.support import RUN_ROOT
    from tests.support.https import Nginx
    from tests.support.pki import make_ec_key

    size_mb = int(os.environ.get("BENCH_FETCH_MB", "1024"))
    repeats = int(os.environ.get("BENCH_REPEATS", "3"))
    root = pathlib.Path(tempfile.mkdtemp(prefix="sealbox-bench-fetch-"))
    os.chmod(root, 0o755)
    nginx = None
    try:
        key, pub = make_ec_key(root, "signer")
        model = root / "model"
        model.mkdir()
        per_file = size_mb // 4 << 20
        for i in range(4):
            with open(model / f"shard{i}.bin", "wb") as f:
                for _ in range(per_file >> 24):
                    f.write(os.urandom(16 << 20))
        publisher.main(["sign", "key", str(model), "--private-key", str(key)])
        nginx = Nginx(root / "nginx")
        url = nginx.publish(model, "models/big")
        shutil.rmtree(model)
        names = [f"shard{i}.bin" for i in range(4)]
        pol = policy_from_toml({"sources": [nginx.url + "models/"], "public_keys": [str(pub)]}, "bench")
        total = 4 * per_file

        def curl():
            out = root / "curl"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            args = ["curl", "-sS", "--fail", "--cacert", str(nginx.ca)]
            for n in ["model.sig", *names]:
                args += ["-o", str(out / n), url + n]
            subprocess.run(args, check=True)

        def pipeline(transport_factory):
            def run():
                state = root / "state"
                shutil.rmtree(state, ignore_errors=True)
                t = transport_factory()
                try:
                    got = fetch_model("big", url, pol, Store(str(state)), t, None)
                finally:
                    t.close()
                assert got.downloaded == total
            return run

        in_process = pipeline(lambda: HttpsTransport(url, pol.source_urls, ca_bundle=str(nginx.ca)))
        sandboxed = pipeline(lambda: SandboxedTransport(url, pol.source_urls,
                                                        SandboxProfile.for_fetch_helper(python=sys.executable),
                                                        os.path.join(RUN_ROOT, "bench-fetch"), ca_bundle=str(nginx.ca)))

        def cli():
            target = root / "cli-out"
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run([sys.executable, "-c", "import sys; from sealbox.client.cli import main; sys.exit(main())",
                            "fetch", url, "--to", str(target), "--public-key", str(pub), "--ca-bundle", str(nginx.ca),
                            "--quiet"], check=True)

        results = {}
        for label, fn in (("curl (baseline)", curl), ("fetch pipeline, in-process urllib3", in_process),
                          ("fetch pipeline, sandboxed helper", sandboxed),
                          ("`sealbox fetch` (fetch + verify + write)", cli)):
            samples = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            results[label] = statistics.median(samples)
        base = results["curl (baseline)"]
        print(f"HTTPS fetch of a {size_mb} MiB signed model (4 files) on loopback, medians of {repeats}:")
        for label, seconds in results.items():
            print(f"  {label:45s} {seconds:7.2f} s  {total / seconds / 1e9:5.2f} GB/s  {seconds / base:5.2f}x curl")

        start_to_ready(root, nginx, repeats)
    finally:
        if nginx is not None:
            nginx.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def start_to_ready(root: pathlib.Path, nginx, repeats: int) -> None:
    """sealboxd start to READY: the demo model from a local path vs fetched from nginx (source =)."""
    from sealbox.client import publisher
    from sealbox.client.demo_model import build_demo_model
    from tests.support.daemon import Daemon
    from tests.support.pki import make_ec_key

    key, pub = make_ec_key(root, "demo-signer")
    demo = root / "demo"
    build_demo_model(str(demo))
    publisher.main(["sign", "key", str(demo), "--private-key", str(key)])
    url = nginx.publish(demo, "models/demo")
    results = {}
    for label, model in (("local path", {"path": demo}),
                         ("source = https:// (fetched, sandboxed helper)",
                          {"source": url, "options": f'source_ca = "{nginx.ca}"'})):
        samples = []
        for i in range(repeats):
            d = Daemon(pathlib.Path(tempfile.mkdtemp(dir=root)), {"demo": model}, pub)
            t = time.perf_counter()
            d.start()
            samples.append(time.perf_counter() - t)
            d.stop()
        results[label] = statistics.median(samples)
    base = results["local path"]
    print(f"sealboxd start to READY, demo model, medians of {repeats}:")
    for label, seconds in results.items():
        print(f"  {label:45s} {seconds:7.2f} s  {seconds / base:5.2f}x")


if __name__ == "__main__":
    sys.exit(main())
