"""Verifying a signed model: upstream `model_signing verify` vs `sealbox verify` vs the daemon's verify-and-seal vs the floor.

    python -m benchmarks.bench_verify [--mib 1024] [--files 4] [--repeat 7] [--alternatives]   (from the repository root)

(or SEALBOX_BENCH_MIB=256). Makes a model of FILES random files totalling MIB
MiB in a temporary directory, signs it with the upstream `model_signing sign
key` (and a copy of the signature with BLAKE3 by `sealbox sign`), warms the
page cache, then times every way of checking it, interleaved round by round
(one run of each per round), and prints medians and ratios against
`model_signing verify` and against the floor measured in the same run:

* floor: reading and hashing the files with SHA-256 on every core, as one
  `openssl dgst -sha256` process per core, and as hashlib on one thread per core;
* `model_signing verify key` and `sealbox verify` as the command lines (each
  with its interpreter's start-up; `--version` / `--help` show that alone);
* the daemon's verify-and-seal: `verify_model(...)` in-process, exactly the
  daemon's call (memfds closed off the clock, as the daemon keeps them while
  the model serves), and its hash-only form (`seal=False`, what the CLI runs).

--alternatives also times other ways to fill the sealed memfds (why
trust/_hashing.py does what it does).
Goals (issue 11): `sealbox verify` <= 0.6x `model_signing verify`; the
daemon's verify-and-seal <= 1.0x it.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sealbox.client import publisher
from sealbox.daemon.config import policy_from_toml
from sealbox.proto.contract import MEMFD_SEALS
from sealbox.trust import verify_model
from tests.support.pki import make_ec_key

BIN = Path(sys.executable).parent
MODEL_SIGNING, SEALBOX = str(BIN / "model_signing"), str(BIN / "sealbox")
CPUS = len(os.sched_getaffinity(0))
SEALED = "daemon's verify-and-seal: verify_model, sha256"


def make_model(directory: Path, mib: int, files: int) -> list[Path]:
    directory.mkdir(mode=0o755)
    per_file = (mib << 20) // files
    paths = []
    for i in range(files):
        path = directory / f"model-{i:05d}.safetensors"
        with open(path, "wb") as f:
            for _ in range(0, per_file, 16 << 20):
                f.write(os.urandom(min(16 << 20, per_file)))
            f.truncate(per_file)
        os.chmod(path, 0o644)
        paths.append(path)
    return paths


def split(paths: list[Path], parts: int) -> list[list[Path]]:
    return [paths[i::parts] for i in range(parts) if paths[i::parts]]


def ways(model: Path, files: list[Path], key: Path, pub: Path, blake3_sig: Path, alternatives: bool):
    """(label, fn) in print order; fn returns an optional clean-up run off the clock."""
    policy = policy_from_toml({"sources": [str(model.parent)], "public_keys": [str(pub)]}, "bench")
    policy_b3 = policy_from_toml({"sources": [str(model.parent)], "public_keys": [str(pub)],
                                  "signature": str(blake3_sig)}, "bench")

    def run(*argv):
        return lambda: subprocess.run(argv, check=True, capture_output=True)

    def openssl():
        procs = [subprocess.Popen(["openssl", "dgst", "-sha256", *map(str, part)], stdout=subprocess.DEVNULL)
                 for part in split(files, CPUS)]
        assert all(p.wait() == 0 for p in procs)

    def hashlib_threads():
        def one(paths):
            for p in paths:
                with open(p, "rb") as f:
                    hashlib.file_digest(f, "sha256")
        with ThreadPoolExecutor(CPUS) as pool:
            list(pool.map(one, split(files, CPUS)))

    def in_process(pol, seal):
        def go():
            return verify_model("bench", str(model), pol, None, None, seal=seal).close
        return go

    rows = []
    if shutil.which("openssl"):
        rows.append(("floor: openssl dgst -sha256, one process per core", openssl))
    rows += [
        ("floor: hashlib.sha256, one thread per core", hashlib_threads),
        ("model_signing verify key (upstream CLI)", run(MODEL_SIGNING, "verify", "key", str(model), "--signature",
                                                       str(model / "model.sig"), "--public_key", str(pub))),
        ("sealbox verify (CLI: hash only)", run(SEALBOX, "verify", str(model), "--public-key", str(pub))),
        (SEALED, in_process(policy, True)),
        ("  verify_model(seal=False): the CLI's, in-process", in_process(policy, False)),
        ("  verify_model, BLAKE3-signed (sealbox sign --hash blake3)", in_process(policy_b3, True)),
        ("start-up only: model_signing --version", run(MODEL_SIGNING, "--version")),
        ("start-up only: sealbox verify --help", run(SEALBOX, "verify", "--help")),
    ]
    if alternatives:
        rows += [(f"  alt. seal: {label}", seal_with(fill, files)) for label, fill in ALTERNATIVES]
    return rows


# -- other ways to fill a sealed memfd with a file's bytes and hash them (--alternatives)
def _new_memfd(size: int) -> int:
    fd = os.memfd_create("bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def _read_hash_write(src: int, size: int, chunk: int) -> int:
    memfd, h, buf = _new_memfd(size), hashlib.sha256(), mmap.mmap(-1, chunk)
    with memoryview(buf) as view:
        offset = 0
        while offset < size:
            n = os.preadv(src, [view[:min(chunk, size - offset)]], offset)
            h.update(view[:n])
            os.pwrite(memfd, view[:n], offset)
            offset += n
    buf.close()
    return memfd


def _sendfile_then_hash_mapping(src: int, size: int) -> int:
    memfd, offset = _new_memfd(size), 0
    while offset < size:
        offset += os.sendfile(memfd, src, offset, size - offset)
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, MEMFD_SEALS)   # sealed first, then hashed: what it holds
    with mmap.mmap(memfd, size, prot=mmap.PROT_READ) as m, memoryview(m) as view:
        h = hashlib.sha256()
        for o in range(0, size, 1 << 20):
            h.update(view[o:o + (1 << 20)])
    return memfd


def _read_into_mapping(src: int, size: int) -> int:
    memfd, h = _new_memfd(size), hashlib.sha256()
    with mmap.mmap(memfd, size) as m, memoryview(m) as view:
        offset = 0
        while offset < size:
            n = os.preadv(src, [view[offset:offset + min(1 << 20, size - offset)]], offset)
            h.update(view[offset:offset + n])
            offset += n
    return memfd


ALTERNATIVES = [
    ("pread 1 MiB, hash, pwrite (trust/_hashing.py)", lambda src, size: _read_hash_write(src, size, 1 << 20)),
    ("pread 8 MiB, hash, pwrite (before issue 11)", lambda src, size: _read_hash_write(src, size, 8 << 20)),
    ("sendfile into the memfd, seal, hash its mmap", _sendfile_then_hash_mapping),
    ("pread into an mmap of the memfd, hash it", _read_into_mapping),
]


def seal_with(fill, files: list[Path]):
    def one(path: Path) -> int:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return fill(src, os.fstat(src).st_size)
        finally:
            os.close(src)

    def go():
        with ThreadPoolExecutor(CPUS) as pool:
            fds = list(pool.map(one, files))
        return lambda: [os.close(fd) for fd in fds]
    return go


def cpu_seconds() -> float:
    """User + system time of this process and its finished children: on a machine shared with other
    work, CPU time says what a way costs even when wall time says mostly how busy the machine was."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measure(rows, repeat: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds; interleaved: each round runs every way once, so load from other work hits
    all alike."""
    wall: dict[str, list[float]] = {label: [] for label, _ in rows}
    cpu: dict[str, list[float]] = {label: [] for label, _ in rows}
    for round_ in range(repeat + 1):
        for label, fn in rows:
            c, t = cpu_seconds(), time.perf_counter()
            cleanup = fn()
            elapsed, used = time.perf_counter() - t, cpu_seconds() - c
            if callable(cleanup):
                cleanup()
            if round_:   # round 0 warms up
                wall[label].append(elapsed)
                cpu[label].append(used)
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=int(os.environ.get("SEALBOX_BENCH_MIB", "1024")))
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--alternatives", action="store_true", help="also time other ways to fill the sealed memfds")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sealbox-bench-verify-"))
    try:
        os.chmod(tmp, 0o755)
        key, pub = make_ec_key(tmp)
        model = tmp / "model"
        files = make_model(model, args.mib, args.files)
        subprocess.run([MODEL_SIGNING, "sign", "key", str(model), "--private_key", str(key),
                        "--signature", str(model / "model.sig")], check=True, capture_output=True)
        with contextlib.redirect_stdout(io.StringIO()):
            assert publisher.main(["sign", "key", str(model), "--private-key", str(key), "--hash", "blake3",
                                   "--signature", str(tmp / "blake3.sig")]) == 0
        total = sum(p.stat().st_size for p in files)
        os.sync()  # no writeback competing with the measurements
        for p in files:  # warm the page cache
            p.read_bytes()
        rows = ways(model, files, key, pub, tmp / "blake3.sig", args.alternatives)
        load_before = os.getloadavg()[0]
        samples, cpu = measure(rows, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {label: statistics.median(s) for label, s in samples.items()}
    upstream = med["model_signing verify key (upstream CLI)"]
    floor = min(t for label, t in med.items() if label.startswith("floor"))
    cpu_med = {label: statistics.median(s) for label, s in cpu.items()}
    print(f"model: {args.files} files, {total / 2**20:.0f} MiB, signed by model_signing (sha256, files), page cache warm, "
          f"{CPUS} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; median of {args.repeat} interleaved rounds")
    print(f"  {'':60s} {'wall':>9s} {'GB/s':>6s}  {'vs model_signing':>16s}  {'vs floor':>8s}  {'CPU':>8s}")
    for label, t in med.items():
        rate = "" if "start-up" in label else f"{total / t / 1e9:6.2f}"
        print(f"  {label:60s} {t * 1e3:6.0f} ms {rate:>6s}  {t / upstream:15.2f}x  {t / floor:7.2f}x  "
              f"{cpu_med[label] * 1e3:5.0f} ms")
    cli, sealed = med["sealbox verify (CLI: hash only)"], med[SEALED]
    print(f"goals: sealbox verify {cli / upstream:.2f}x model_signing verify (goal <= 0.6x); "
          f"the daemon's verify-and-seal {sealed / upstream:.2f}x (goal <= 1.0x); floor {floor * 1e3:.0f} ms")
    cpu_upstream = cpu_med["model_signing verify key (upstream CLI)"]
    cpu_cli, cpu_sealed = cpu_med["sealbox verify (CLI: hash only)"], cpu_med[SEALED]
    print(f"  in CPU time: sealbox verify {cpu_cli / cpu_upstream:.2f}x, the daemon's verify-and-seal "
          f"{cpu_sealed / cpu_upstream:.2f}x model_signing verify")
    return 0


if __name__ == "__main__":
    sys.exit(main())
