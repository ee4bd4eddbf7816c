"""The LOAD record that hands a warm-pool worker its model: the handoff and sealed memfds, checked."""
from __future__ import annotations

import array
import fcntl
import json
import os
import socket

import pytest

from sealbox.proto import hop
from sealbox.proto.contract import MEMFD_SEALS, Batching, ModelHandoff, SpecError, handoff_from_dict


def sealed(data: bytes) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    return fd


def pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def test_load_carries_the_handoff_and_the_memfds():
    a, b = pair()
    fds = [sealed(b"first"), sealed(b"second file")]
    handoff = ModelHandoff(files={"a.json": 0, "b.bin": 1}, max_message_bytes=1234, batching=Batching(8, 100, (4,)))
    hop.send_load(a, json.dumps({"files": handoff.files, "max_message_bytes": 1234,
                                 "batching": {"max_batch_size": 8, "max_queue_delay_us": 100,
                                              "preferred_batch_sizes": [4]}}).encode(), fds)
    body, got = hop.recv_load(b)
    assert handoff_from_dict(json.loads(body)) == handoff
    assert [os.pread(fd, 64, 0) for fd in got] == [b"first", b"second file"]
    for fd in fds + got:
        os.close(fd)


def test_load_refuses_an_unsealed_descriptor_and_closes_all():
    a, b = pair()
    good, bad = sealed(b"x"), os.memfd_create("u", os.MFD_CLOEXEC)
    hop.send_load(a, b"{}", [good, bad])
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(hop.ProtocolError, match="a LOAD descriptor is not a sealed memfd"):
        hop.recv_load(b)
    assert set(os.listdir("/proc/self/fd")) <= before   # nothing received is left open


def test_load_refuses_another_record_and_too_many_descriptors():
    a, b = pair()
    hop.send(a, hop.INFER, 1, [b"x"])
    with pytest.raises(hop.ProtocolError, match="expected one LOAD record"):
        hop.recv_load(b)
    fds = [sealed(b"x") for _ in range(hop.MAX_LOAD_FDS + 1)]
    with pytest.raises(ValueError):
        hop.send_load(a, b"{}", fds)
    a.sendmsg([hop.header(hop.LOAD, 0, 2), b"{}"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    with pytest.raises(hop.ProtocolError, match="more than 64 descriptors"):
        hop.recv_load(b)
    for fd in fds:
        os.close(fd)
    # A LOAD is never accepted on a serving connection.
    a.sendmsg([hop.header(hop.LOAD, 0, 0)])
    with pytest.raises(hop.ProtocolError, match="unexpected record kind 7"):
        hop.recv(b, 1024, hop.TO_WORKER)


def test_handoff_refusals():
    for bad in ([], {"files": {"a": "3"}}, {"files": {"a": True}}, {"nope": 1},
                {"batching": {"max_batch_size": 2, "preferred_batch_sizes": [3]}}):
        with pytest.raises(SpecError):
            handoff_from_dict(bad)
