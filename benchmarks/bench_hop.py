"""The hop's inline/memfd crossover (proto/hop.py INLINE_MAX): one record of N bytes sent and received
over a real SOCK_SEQPACKET socketpair, inline (one sendmsg copy) against a sealed memfd (memfd_create,
write, seal, SCM_RIGHTS, then fstat, seal check, mmap and one copy out on the receiving side).
Medians of many round trips, in one process (the same copies the supervisor and worker make)."""
from __future__ import annotations

import os
import socket
import statistics
import time

from sealbox.proto import hop


def one_way(size: int, memfd: bool, repeats: int) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20)
    body = os.urandom(size)
    samples = []
    saved = hop.INLINE_MAX
    hop.INLINE_MAX = 0 if memfd else 2**30
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            record = hop.Outgoing(hop.RESPONSE, 1, [body], hop.FINAL)
            record.send_on(a)
            record.close()
            data, ancdata, flags, _ = b.recvmsg(hop.HEADER.size + size + 64, socket.CMSG_SPACE(8))
            fds = hop._fds(ancdata)
            if fds:
                mapped = hop._map_memfd(fds[0], size)
                os.close(fds[0])
                copy = bytes(mapped)
                mapped.close()
            else:
                copy = data[hop.HEADER.size:]
            samples.append(time.perf_counter() - t)
            assert len(copy) == size
    finally:
        hop.INLINE_MAX = saved
        a.close(), b.close()
    return statistics.median(samples)


def main() -> None:
    print(f"{'body':>10} {'inline':>10} {'memfd':>10}  (median one-way send + receive + one copy out)")
    for size in (4096, 16384, 65536, 131072, 262144, 1 << 20):
        inline, memfd = one_way(size, False, 300), one_way(size, True, 300)
        print(f"{size:>10} {inline * 1e6:8.1f}us {memfd * 1e6:8.1f}us   memfd/inline {memfd / inline:.2f}x")
    print(f"INLINE_MAX = {hop.INLINE_MAX}")


if __name__ == "__main__":
    main()
