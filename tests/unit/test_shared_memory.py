"""The shared-memory region registry (daemon/shared_memory.py) on real files, as any user.

The registry is given a temporary directory in place of /dev/shm so that these tests need no
root; the daemon-level tests (tests/daemon/test_shared_memory_daemon.py) use /dev/shm itself.
"""
from __future__ import annotations

import fcntl
import os

import grpc
import pytest

from sealbox.daemon.errors import ClientError
from sealbox.daemon.shared_memory import SharedMemoryRegistry, shm_input_memfd, write_output
from sealbox.proto import inference_pb2 as pb
from sealbox.proto.contract import MEMFD_SEALS
from sealbox.proto.wire import PeekError, shared_memory_tensors

ME = frozenset({os.getuid()})


@pytest.fixture
def shm(tmp_path):
    def make(name: str, size: int) -> str:
        path = tmp_path / name
        path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
        return "/" + name
    return SharedMemoryRegistry(shm_dir=str(tmp_path), max_regions=3), make, tmp_path


def refused(fn, *args) -> ClientError:
    with pytest.raises(ClientError) as info:
        fn(*args)
    return info.value


def test_register_use_and_unregister(shm):
    reg, make, _ = shm
    key = make("in0", 4096)
    region = reg.register("public", ME, "in0", key, 256, 1024)
    assert (region.key, region.offset, region.byte_size) == ("/in0", 256, 1024)
    assert [r.name for r in reg.status("public", "")] == ["in0"]
    used = reg.acquire("public", "in0")
    fd = shm_input_memfd(used, 16, 32, "input 'x'")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & MEMFD_SEALS == MEMFD_SEALS
        file_bytes = (shm[2] / "in0").read_bytes()
        assert os.pread(fd, 64, 0) == file_bytes[256 + 16:256 + 48]   # region offset 256, then 16 into it
    finally:
        os.close(fd)
    reg.unregister("public", "in0")
    os.fstat(used.fd)            # still open: a call is using it
    reg.release(used)
    with pytest.raises(OSError):
        os.fstat(used.fd)        # closed once the last user let go
    assert refused(reg.acquire, "public", "in0").code == grpc.StatusCode.INVALID_ARGUMENT


def test_registration_refusals(shm, tmp_path):
    reg, make, root = shm
    key = make("r", 1024)
    assert refused(reg.register, "public", frozenset(), "a", key, 0, 16).code == grpc.StatusCode.PERMISSION_DENIED
    other = refused(reg.register, "public", frozenset({os.getuid() + 1}), "a", key, 0, 16)
    assert other.code == grpc.StatusCode.PERMISSION_DENIED and "owned by a user this listener does not accept" in other.message
    assert "is outside 'r' (1024 bytes)" in refused(reg.register, "public", ME, "a", key, 1000, 100).message
    assert "one shared-memory object" in refused(reg.register, "public", ME, "a", "/../etc/passwd", 0, 1).message
    assert "cannot open shared-memory object 'nope'" in refused(reg.register, "public", ME, "a", "/nope", 0, 1).message
    os.symlink(root / "r", root / "link")
    assert "cannot open shared-memory object 'link'" in refused(reg.register, "public", ME, "a", "/link", 0, 1).message
    os.mkfifo(root / "fifo")
    assert "is not a shared-memory object" in refused(reg.register, "public", ME, "a", "/fifo", 0, 1).message
    assert refused(reg.register, "public", ME, "", key, 0, 1).code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(reg.register, "public", ME, "a", key, 0, 0).code == grpc.StatusCode.INVALID_ARGUMENT
    reg.register("public", ME, "a", key, 0, 16)
    assert refused(reg.register, "public", ME, "a", key, 0, 16).code == grpc.StatusCode.ALREADY_EXISTS
    reg.register("public", ME, "b", key, 0, 16)
    reg.register("public", ME, "c", key, 0, 16)
    assert refused(reg.register, "public", ME, "d", key, 0, 16).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    reg.close()


def test_listeners_do_not_share_regions(shm):
    reg, make, _ = shm
    reg.register("team-a", ME, "x", make("x", 64), 0, 64)
    assert reg.status("team-b", "") == []
    assert refused(reg.status, "team-b", "x").code == grpc.StatusCode.NOT_FOUND
    assert refused(reg.acquire, "team-b", "x").code == grpc.StatusCode.INVALID_ARGUMENT
    reg.unregister("team-b", "")             # unregister-all of another listener leaves team-a's region
    assert [r.name for r in reg.status("team-a", "")] == ["x"]
    reg.close()


def test_bounds_and_a_truncated_region(shm):
    reg, make, root = shm
    region = reg.register("public", ME, "t", make("t", 4096), 0, 4096)
    msg = refused(shm_input_memfd, region, 4000, 200, "input 'x'").message
    assert msg == "shared memory: input 'x': bytes [4000, 4200) are outside region 't' of 4096 bytes"
    assert "outside region" in refused(write_output, region, -1, b"ab", "output 'y'").message
    os.truncate(root / "t", 100)             # the owner shrinks its region under the daemon
    assert "shorter than registered" in refused(shm_input_memfd, region, 0, 4096, "input 'x'").message
    write_output(region, 4000, b"z" * 96, "output 'y'")   # pwrite: grows the file, never SIGBUS
    assert (root / "t").read_bytes()[4000:] == b"z" * 96
    reg.close()


def test_request_scan_finds_shared_memory_tensors():
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="a", datatype="FP32", shape=[1])
    b = req.inputs.add(name="b", datatype="FP32", shape=[4])
    b.parameters["shared_memory_region"].string_param = "in0"
    b.parameters["shared_memory_byte_size"].int64_param = 16
    out = req.outputs.add(name="y")
    out.parameters["shared_memory_region"].string_param = "out0"
    raw = req.SerializeToString() + pb.ModelInferRequest(raw_input_contents=[b"\0" * 4]).SerializeToString()
    found = shared_memory_tensors(raw)
    assert [(f, i) for f, i, _ in found] == [(5, 1), (6, 0)]
    assert pb.ModelInferRequest.InferInputTensor.FromString(found[0][2]).name == "b"
    assert shared_memory_tensors(pb.ModelInferRequest(model_name="m").SerializeToString()) == []
    with pytest.raises(PeekError):
        shared_memory_tensors(raw[:-2])
