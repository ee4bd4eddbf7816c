"""Hash each model file in one pass, copying the very bytes hashed into a sealed memfd (or not).

keep=True (the daemon): each chunk read from the file is hashed and written
into a memfd, which is sealed against writes, growth and shrinking once
every file is done, so what the worker later reads from /proc/self/fd/N is
what was verified, whatever happens to the file on disk meanwhile.
keep=False (`sealbox verify`, `sealbox hash`, signing): the same reads and
the same digests, nothing kept. The digests, and so every verdict, are the
same either way: only where the bytes go differs.

Work is split into ranges (a whole file, or one shard) and spread over a
thread pool: hashlib and blake3 release the GIL on large updates, and so do
preadv/pwrite. Each range reads into buffers of its own, mapped for that
range and unmapped when it is done: no buffer outlives a load (8 MiB
buffers that went through malloc stayed in glibc's per-thread arenas:
+32-48 MiB after the first call on 2 cores with glibc's default settings,
more with more cores; the daemon's fixed mmap threshold hid it).

Measured on 1 GiB (4 files, 2 cores, page cache warm; README "Benchmarks"):
at a quiet moment 1 MiB chunks hashed and copied in 560-575 ms against
690-900 ms with 8 MiB (the chunk is still in the CPU cache when it is
written); on a loaded machine the two are within noise, 1 MiB using a few
% less CPU. sendfile() into the memfd and hashing an mmap of it, or reading
straight into a mapping of the memfd, cost 20-40 % more CPU (page faults on
fresh shmem pages); copy_file_range() into a memfd fails with EXDEV.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from ._storage import OpenFile
from .errors import VerificationError

CHUNK = 1 << 20
PIPELINE_DEPTH = 4  # buffers per range while a writer thread copies what this one has hashed
ALGORITHMS = ("sha256", "blake2b", "blake3")


def new_hasher(algorithm: str):
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake2b":
        return hashlib.blake2b()
    if algorithm == "blake3":
        return blake3.blake3()
    raise ValueError(f"unsupported hash algorithm {algorithm!r}")


@dataclass
class Hashed:
    name: str
    memfd: int  # sealed, CLOEXEC, the caller owns it; -1 when only hashed (keep=False)
    size: int
    # (start, end) -> raw digest; one entry (0, size) in files mode, none for
    # an empty file in shards mode (model_signing emits no shard for it).
    digests: dict[tuple[int, int], bytes] = field(default_factory=dict)


def ranges(size: int, shard_size: int | None) -> list[tuple[int, int]]:
    if shard_size is None:
        return [(0, size)]
    return [(start, min(start + shard_size, size)) for start in range(0, size, shard_size)]


def _write_all(memfd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(memfd, data[written:], offset + written)


def _hash_range(src: OpenFile, memfd: int, start: int, end: int, algorithm: str,
                progress: Callable[[int], None] | None, writer: ThreadPoolExecutor | None) -> bytes:
    """Hashes bytes [start, end) of src and (memfd >= 0) writes the very same buffer into the
    memfd: inline, or on a `writer` thread while this one hashes the next chunk (so one big
    file still keeps two cores busy)."""
    hasher = new_hasher(algorithm)
    depth = PIPELINE_DEPTH if writer is not None else 1
    length = min(CHUNK, max(end - start, 1))
    area = mmap.mmap(-1, length * depth)  # anonymous, page-aligned; unmapped below
    pending: list = [None] * depth
    offset, k = start, 0
    try:
        with memoryview(area) as whole:
            bufs = [whole[i * length:(i + 1) * length] for i in range(depth)]
            try:
                while offset < end:
                    slot = k % depth
                    if pending[slot] is not None:
                        pending[slot].result()  # that buffer's bytes are in the memfd: reuse it
                        pending[slot] = None
                    n = os.preadv(src.fd, [bufs[slot][:min(length, end - offset)]], offset)
                    if n == 0:
                        raise VerificationError(src.path, "storage", f"shrank while being hashed (expected {src.size} bytes)")
                    with bufs[slot][:n] as data:
                        # Both only read the buffer; it is not refilled until both are done.
                        if memfd >= 0 and writer is not None:
                            pending[slot] = writer.submit(_write_all, memfd, bufs[slot][:n], offset)
                        hasher.update(data)
                        if memfd >= 0 and writer is None:
                            _write_all(memfd, data, offset)  # after hashing: measured faster, the chunk still cached
                    offset += n
                    k += 1
                    if progress:
                        progress(n)
            finally:
                for p in pending:
                    if p is not None:
                        p.result()
                pending = []
                for b in bufs:
                    b.release()
    finally:
        with contextlib.suppress(BufferError):  # a view still alive in a traceback: unmapped when it goes
            area.close()
    return hasher.digest()


def hash_into_memfds(files: list[OpenFile], algorithm: str, shard_size: int | None = None,
                     workers: int | None = None,
                     progress: Callable[[int], None] | None = None,
                     keep: bool = True) -> dict[str, Hashed]:
    """Hashes every file (and with keep=True copies it into a memfd, sealed at the end);
    returns name -> Hashed. keep=False only hashes (memfd -1): the CLI's verify, the
    publisher's hash and sign. On any error all memfds made so far are closed before raising.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported hash algorithm {algorithm!r}")
    if keep:
        from ..proto.contract import MEMFD_SEALS  # here: the worker contract's dataclasses cost the CLI ~6 ms
    out: dict[str, Hashed] = {}
    try:
        jobs = []
        for f in files:
            # Names show in /proc/PID/fd; the kernel caps them at 249 bytes.
            memfd = -1
            if keep:
                memfd = os.memfd_create(("sealbox:" + f.name)[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            out[f.name] = Hashed(f.name, memfd, f.size)  # owned by `out` from here on
            if keep:
                os.ftruncate(memfd, f.size)
            jobs += [(f, memfd, s, e) for s, e in ranges(f.size, shard_size)]
        jobs.sort(key=lambda j: j[3] - j[2], reverse=True)  # biggest first: the last one to start is small
        cpus = workers or len(os.sched_getaffinity(0))
        workers = min(len(jobs), cpus) or 1
        # Measured: copying on separate threads pays only when one job is too
        # big to share out (a lone 1 GiB file: ~2x); with enough jobs to fill
        # the cores, the extra threads only cost.
        biggest = max((e - s for _, _, s, e in jobs), default=0)
        pipeline = keep and biggest * cpus > sum(e - s for _, _, s, e in jobs)
        copiers = ThreadPoolExecutor(workers, thread_name_prefix="sealbox-copy") if pipeline else contextlib.nullcontext()
        with ThreadPoolExecutor(workers, thread_name_prefix="sealbox-hash") as pool, copiers as writer:
            futures = [(f, s, e, pool.submit(_hash_range, f, memfd, s, e, algorithm, progress, writer))
                       for f, memfd, s, e in jobs]
            try:
                for f, s, e, fut in futures:
                    out[f.name].digests[(s, e)] = fut.result()
            except BaseException:
                for *_, fut in futures:
                    fut.cancel()  # the first failure decides: do not hash the rest
                raise
        for f in files:
            # A file that grew past the size we checked is not the file we checked.
            if os.pread(f.fd, 1, f.size):
                raise VerificationError(f.path, "storage", f"grew while being hashed (expected {f.size} bytes)")
            if keep:
                fcntl.fcntl(out[f.name].memfd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    except BaseException:
        for h in out.values():
            if h.memfd >= 0:
                os.close(h.memfd)
        raise
    return out


def file_digest(files: list[OpenFile], algorithm: str = "sha256",
                progress: Callable[[int], None] | None = None) -> dict[str, bytes]:
    """Whole-file digests without keeping copies (the publisher's hash and sign)."""
    hashed = hash_into_memfds(files, algorithm, progress=progress, keep=False)
    return {name: h.digests[(0, h.size)] for name, h in hashed.items()}
