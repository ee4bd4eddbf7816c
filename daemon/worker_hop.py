"""The supervisor -> worker inference hop as seen from the public server's event loop.

One grpc.aio channel per worker process, made lazily on the event loop thread by the first call
(grpc.aio channels belong to the loop they were made on) and closed on that loop when the worker
is stopped (`close_soon()` may be called from any thread). An awaited call costs a pending
coroutine, not a thread, so a hung worker holds nothing but its own model's turn
(admission.ModelGate, one call at a time: the worker has one engine thread).

This is the narrow seam the data-path work replaces: `await hop.infer(request_bytes, timeout)`
returns the worker's response bytes or raises grpc.aio.AioRpcError / a transport exception; the
supervisor (Supervisor.infer) turns every failure into a fixed client-facing error (errors.py).
The sync channel of worker_process.WorkerProcess stays for Describe at load time.
"""
from __future__ import annotations

import asyncio

import grpc

from ..proto import message_options
from ..proto.contract import WORKER_INFER

# The socket appears a few ms after spawn: retry quickly instead of gRPC's 1 s backoff.
WORKER_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 5), ("grpc.min_reconnect_backoff_ms", 5),
                    ("grpc.max_reconnect_backoff_ms", 100)]


class WorkerHop:
    def __init__(self, socket_path: str, max_message_bytes: int):
        self.loop = asyncio.get_running_loop()
        opts = [*message_options(max_message_bytes), *WORKER_RECONNECT,
                ("grpc.use_local_subchannel_pool", 1)]   # never share a connection with a replaced worker
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=opts)
        self._infer = self.channel.unary_unary(WORKER_INFER, request_serializer=None, response_deserializer=None)
        self.closed = False

    async def infer(self, request: bytes, timeout: float) -> bytes:
        return await self._infer(request, timeout=timeout, wait_for_ready=False)

    async def close(self) -> None:
        self.closed = True
        await self.channel.close()

    def close_soon(self) -> None:
        """Close the channel on its own loop; callable from any thread, idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.channel.close()))
        except RuntimeError:   # the loop has ended (daemon shutdown): nothing left to close on
            pass
