"""Unary-request methods (health, metadata, the repository, the shared-memory RPCs) through real grpc.aio
listeners on Unix sockets, with the real access interceptor and admission (daemon/listeners.py _wrap,
daemon/admission.py read_unary): a caller whose requests never arrive holds neither the control lane nor
another caller's reads, and has at most UNARY_READS + UNARY_WAITERS of them waiting."""
from __future__ import annotations

import asyncio
import os
import tempfile

import grpc

from sealbox.daemon import listeners as L
from sealbox.daemon import roles as R
from sealbox.daemon.admission import UNARY_READS, UNARY_WAITERS, Admission, Limits
from sealbox.daemon.audit import AuditLog
from sealbox.daemon.call_audit import CallAudit
from sealbox.proto import inference_pb2 as pb

LIVE = "/inference.GRPCInferenceService/ServerLive"


async def _live(request, context):
    return pb.ServerLiveResponse(live=True)


def _add_handlers(server):
    handler = grpc.unary_unary_rpc_method_handler(_live, request_deserializer=pb.ServerLiveRequest.FromString,
                                                  response_serializer=pb.ServerLiveResponse.SerializeToString)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService",
                                                                          {"ServerLive": handler})])


def _spec(directory: str, name: str, roles) -> L.ListenerSpec:
    return L.ListenerSpec(name, "unix", os.path.join(directory, f"{name}.sock"), frozenset(roles),
                          owner=os.getuid(), group=os.getgid())


def test_a_caller_that_never_sends_its_request_delays_no_one_else():
    async def main():
        directory = tempfile.mkdtemp()
        admission = Admission(Limits(read_timeout_s=20))
        audit = CallAudit(AuditLog(os.path.join(directory, "audit.jsonl")))
        public = _spec(directory, "public", {R.HEALTH, R.METADATA, R.INFERENCE})
        admin = _spec(directory, "admin", R.ALL_ROLES)
        listeners = await L.start_all([public, admin], Limits(read_timeout_s=20), admission, audit, _add_handlers)
        channels = [grpc.aio.insecure_channel(f"unix:{public.address}", options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(4)]
        held = [channels[i % 4].stream_unary(LIVE)() for i in range(UNARY_READS + UNARY_WAITERS)]
        try:
            await asyncio.sleep(0.5)   # every held call has started and waits for its message
            assert admission.control == 0   # a call not yet read holds no lane
            # One more from the same caller (the public listener) is refused at once ...
            try:
                await channels[0].unary_unary(LIVE)(pb.ServerLiveRequest().SerializeToString(), timeout=5)
                extra = "OK"
            except grpc.aio.AioRpcError as exc:
                extra = (exc.code(), exc.details())
            assert extra == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                             "sealbox is at its limit of requests being received for this caller; retry later")
            # ... while another caller (the admin socket) is answered at once.
            async with grpc.aio.insecure_channel(f"unix:{admin.address}") as channel:
                answer = await channel.unary_unary(LIVE, response_deserializer=pb.ServerLiveResponse.FromString)(
                    pb.ServerLiveRequest().SerializeToString(), timeout=5)
            assert answer.live
        finally:
            for call in held:
                call.cancel()
            await asyncio.gather(*(c.close() for c in channels))
            for listener in listeners:
                await listener.stop(None)
            audit.close()
        await asyncio.sleep(0.1)
        assert admission.control == 0 and admission.snapshot()["control"] == 0
        return admission._unary_reads
    assert asyncio.run(main()) == {}   # every caller's reads were let go
