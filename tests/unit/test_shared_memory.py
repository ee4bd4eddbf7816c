"""The shared-memory region registry (daemon/shared_memory.py) on real files, as any user.

The registry is given a temporary directory in place of /dev/shm so that these tests need no
root; the daemon-level tests (tests/daemon/test_shared_memory_daemon.py) use /dev/shm itself.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import socket

import grpc
import numpy as np
import pytest

from sealbox.daemon.errors import ClientError
from sealbox.daemon.shared_memory import (ARENA_GRAIN, Arenas, SharedCall, SharedMemoryRegistry, copy_input,
                                          write_output)
from sealbox.proto import hop
from sealbox.proto import inference_pb2 as pb
from sealbox.proto.contract import ARENA_SEALS
from sealbox.proto import wire
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
    arenas = Arenas()
    arena = arenas.take(32)
    try:
        copy_input(used, 16, 32, "input 'x'", arena)
        assert fcntl.fcntl(arena.fd, fcntl.F_GET_SEALS) == ARENA_SEALS
        file_bytes = (shm[2] / "in0").read_bytes()
        assert os.pread(arena.fd, 32, 0) == file_bytes[256 + 16:256 + 48]   # region offset 256, then 16 into it
    finally:
        arenas.give(arena)
        arenas.close()
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
    # A symlink is looked at, never followed (O_PATH | O_NOFOLLOW gives the link itself)
    assert "'link' is not a shared-memory object" in refused(reg.register, "public", ME, "a", "/link", 0, 1).message
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


def test_a_region_is_opened_only_once_its_owner_is_accepted(shm):
    """Root looks at a /dev/shm file (O_PATH) before it opens it read-write: another user's file, or a
    FIFO, is refused without being opened (no open event, no lease break for its owner)."""
    reg, make, root = shm
    key = make("theirs", 1024)
    os.mkfifo(root / "pipe")
    libc = ctypes.CDLL(None, use_errno=True)
    IN_OPEN = 0x20
    watcher = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert watcher >= 0
    try:
        for name in ("theirs", "pipe"):
            assert libc.inotify_add_watch(watcher, str(root / name).encode(), IN_OPEN) >= 0

        def opened() -> int:
            try:
                return len(os.read(watcher, 4096)) // 16   # struct inotify_event, no names for file watches
            except BlockingIOError:
                return 0
        other = refused(reg.register, "public", frozenset({os.getuid() + 1}), "a", key, 0, 16)
        assert other.code == grpc.StatusCode.PERMISSION_DENIED
        assert "is not a shared-memory object" in refused(reg.register, "public", ME, "a", "/pipe", 0, 1).message
        assert opened() == 0
        reg.register("public", ME, "a", key, 0, 16)   # accepted: opened read-write once
        assert opened() == 1
    finally:
        os.close(watcher)
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
    arenas = Arenas()
    arena = arenas.take(4096)
    msg = refused(copy_input, region, 4000, 200, "input 'x'", arena).message
    assert msg == "shared memory: input 'x': bytes [4000, 4200) are outside region 't' of 4096 bytes"
    assert "outside region" in refused(write_output, region, -1, b"ab", "output 'y'").message
    os.truncate(root / "t", 100)             # the owner shrinks its region under the daemon
    assert "shorter than registered" in refused(copy_input, region, 0, 4096, "input 'x'", arena).message
    arenas.give(arena)
    arenas.close()
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


def test_only_a_tensors_name_and_parameters_are_copied_out_for_decoding(shm):
    """The front door decodes shared-memory tensors on its event loop: whatever else a client packs into
    such a tensor (here 4 MiB of empty bytes_contents entries, which protobuf would turn into two million
    objects) is never copied out or decoded; pathological tensors are refused before protobuf sees them."""
    bomb = pb.ModelInferRequest.InferInputTensor(name="x", datatype="BYTES", shape=[1])
    bomb.parameters["shared_memory_region"].string_param = "in0"
    bomb.parameters["shared_memory_byte_size"].int64_param = 16
    wanted = pb.ModelInferRequest.InferInputTensor(name="x")
    wanted.parameters.MergeFrom(bomb.parameters)
    contents = b"\x42\x00" * (2 << 20)   # InferTensorContents.bytes_contents = b"", two million times
    tensor = bomb.SerializeToString() + wire.length_delimited_header(5, len(contents)) + contents
    request = (pb.ModelInferRequest(model_name="m").SerializeToString()
               + wire.length_delimited_header(wire.INFER_REQUEST_INPUTS, len(tensor)) + tensor)
    (field, index, kept), = shared_memory_tensors(request)
    assert (field, index) == (5, 0) and len(kept) < 100
    assert pb.ModelInferRequest.InferInputTensor.FromString(kept) == wanted   # no datatype, shape or contents
    # A tensor that mentions the parameter only in its contents is not a shared-memory tensor.
    plain = pb.ModelInferRequest(model_name="m")
    plain.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"shared_memory_region")
    assert shared_memory_tensors(plain.SerializeToString()) == []

    def with_tensor(t) -> bytes:
        r = pb.ModelInferRequest(model_name="m")
        r.inputs.append(t)
        return r.SerializeToString()
    many = pb.ModelInferRequest.InferInputTensor(name="x")
    many.parameters["shared_memory_region"].string_param = "in0"
    for i in range(300):   # each map entry is a field of the tensor: past wire.MAX_TENSOR_FIELDS
        many.parameters[f"p{i}"].bool_param = True
    with pytest.raises(PeekError, match="too many fields"):
        shared_memory_tensors(with_tensor(many))
    large = pb.ModelInferRequest.InferInputTensor(name="x")
    large.parameters["shared_memory_region"].string_param = "in0"
    large.parameters["note"].string_param = "n" * (64 * 1024)
    with pytest.raises(PeekError, match="exceed 64 KiB"):
        shared_memory_tensors(with_tensor(large))

    # More than 16 inputs naming shared memory: refused before any is decoded or any region is held.
    reg, make, _root = shm
    region = reg.register("public", ME, "in0", make("in0", 4096), 0, 4096)
    seventeen = pb.ModelInferRequest(model_name="m")
    for i in range(17):
        t = seventeen.inputs.add(name=f"x{i}", datatype="FP32", shape=[1])
        t.parameters["shared_memory_region"].string_param = "in0"
        t.parameters["shared_memory_byte_size"].int64_param = 4
    refs = shared_memory_tensors(seventeen.SerializeToString())
    assert len(refs) == 17
    msg = refused(SharedCall, reg, "public", refs).message
    assert msg == "shared memory: at most 16 inputs and 16 outputs may name shared memory"
    assert region.users == 0
    reg.close()


def test_an_input_arena_is_written_only_through_the_supervisors_mapping():
    """What a worker holding an arena's descriptor could try (seals bind root too, so this runs as is):
    reopen it read-write, write, map it writable, make a read-only mapping writable, punch a hole,
    shrink it. Each is refused by the kernel; the supervisor's own mapping still writes."""
    arenas = Arenas()
    arena = arenas.take(100)
    reopened = os.open(f"/proc/self/fd/{arena.fd}", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        with pytest.raises(PermissionError):
            os.pwrite(reopened, b"x", 0)
        with pytest.raises(PermissionError):
            mmap.mmap(reopened, 4096, flags=mmap.MAP_SHARED)
        with pytest.raises(PermissionError):
            os.ftruncate(reopened, 1)
        with pytest.raises(PermissionError):
            os.posix_fallocate(reopened, 0, 2 * ARENA_GRAIN)   # growing it
        punch = 0x02 | 0x01   # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        assert libc.fallocate(reopened, punch, ctypes.c_long(0), ctypes.c_long(4096)) == -1
        assert ctypes.get_errno() == errno.EPERM
        view = mmap.mmap(reopened, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)   # reading is allowed
        seen = np.frombuffer(view, np.uint8)
        assert libc.mprotect(ctypes.c_void_p(seen.ctypes.data), ctypes.c_size_t(4096),
                             mmap.PROT_READ | mmap.PROT_WRITE) == -1
        assert ctypes.get_errno() == errno.EACCES
        arena.mapping[:4] = b"abcd"   # the supervisor's mapping, made before sealing, writes
        assert bytes(seen[:4]) == b"abcd" and os.pread(reopened, 4, 0) == b"abcd"
        del seen
        view.close()
        assert os.fstat(reopened).st_size == ARENA_GRAIN
    finally:
        os.close(reopened)
        arenas.give(arena)
        arenas.close()


def test_an_output_arena_keeps_its_size_and_takes_only_what_fits():
    """The worker writes its output into the arena through its descriptor (as hop.fill_output_arena does);
    it cannot change the arena's size, so the supervisor's read-only mapping never faults."""
    arenas = Arenas(outputs=True)
    arena = arenas.take(10)
    worker_fd = os.open(f"/proc/self/fd/{arena.fd}", os.O_RDWR)
    try:
        assert hop.fill_output_arena(worker_fd, b"hello") == 5
        assert arena.mapping[:5] == b"hello"
        too_big = b"x" * (arena.capacity + 1)
        assert hop.fill_output_arena(worker_fd, too_big) == arena.capacity + 1   # reported, not written
        assert arena.mapping[:5] == b"hello"
        with pytest.raises(PermissionError):
            os.ftruncate(worker_fd, 1)
        with pytest.raises(PermissionError):
            os.posix_fallocate(worker_fd, 0, 2 * ARENA_GRAIN)
        with pytest.raises(TypeError):
            arena.mapping[:1] = b"z"   # the supervisor's own mapping is read-only
    finally:
        os.close(worker_fd)
        arenas.give(arena)
        arenas.close()


def test_input_arenas_are_reused_bounded_and_closed():
    arenas = Arenas(max_free_bytes=2 * ARENA_GRAIN)
    first = arenas.take(100)
    assert first.capacity == ARENA_GRAIN
    arenas.give(first)
    again = arenas.take(ARENA_GRAIN)             # fits: the same memfd, its pages already allocated
    assert again is first
    other = arenas.take(10)                      # while `first` is in a call: another arena
    big = arenas.take(ARENA_GRAIN + 1)           # sized in whole MiB
    assert other is not first and big.capacity == 2 * ARENA_GRAIN
    arenas.give(big)
    arenas.give(first)                           # over max_free_bytes: the one given back longest ago goes
    with pytest.raises(OSError):
        os.fstat(big.fd)
    os.fstat(first.fd)
    assert arenas.take(5) is first               # kept
    bigger = arenas.take(3 * ARENA_GRAIN)
    arenas.give(bigger)                          # larger than max_free_bytes alone: closed at once
    with pytest.raises(OSError):
        os.fstat(bigger.fd)
    small = arenas.take(1)
    arenas.give(first)
    arenas.give(small)                           # both fit: both kept
    assert arenas.take(ARENA_GRAIN) is first and arenas.take(1) is small
    arenas.give(first)
    arenas.give(small)
    arenas.close()                               # the worker's hop closed: free arenas go
    for gone in (first, small):
        with pytest.raises(OSError):
            os.fstat(gone.fd)
    arenas.give(other)                           # an arena still in a call goes when given back
    with pytest.raises(OSError):
        os.fstat(other.fd)


def test_free_arenas_unused_for_a_while_are_closed():
    arenas = Arenas()
    old, recent = arenas.take(1), arenas.take(1)
    arenas.give(old)
    old.freed_at -= 31                           # given back 31 s ago
    arenas.give(recent)
    assert arenas.trim(idle_s=30) is True        # `recent` is kept
    with pytest.raises(OSError):
        os.fstat(old.fd)
    os.fstat(recent.fd)
    assert arenas.trim(idle_s=0) is False        # nothing kept now
    with pytest.raises(OSError):
        os.fstat(recent.fd)
    arenas.close()


def test_a_worker_maps_exactly_its_input_from_a_reused_arena():
    """An arena holds an earlier, larger input past the new one's end: the receiving worker maps only
    the size the record gives, so those bytes are never part of the new call's input."""
    arenas = Arenas()
    arena = arenas.take(8192)
    arena.mapping[:8192] = b"A" * 8192            # the previous call's input
    arena.mapping[:16] = b"new input bytes!"
    supervisor, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        hop.send(supervisor, hop.INFER, 7, [b"request"], side=hop.SHM_SIZE.pack(16), shm_fds=[arena.fd])
        record = hop.recv(worker, 1 << 20, hop.TO_WORKER)
        try:
            assert len(record.shm) == 1 and len(record.shm[0]) == 16 and record.shm[0][:] == b"new input bytes!"
        finally:
            record.release()
    finally:
        supervisor.close()
        worker.close()
        arenas.give(arena)
        arenas.close()


def _shared_call(reg, inputs=(), outputs=()):
    """A SharedCall for a request naming (region, size) inputs and outputs, as the front door makes it."""
    req = pb.ModelInferRequest(model_name="m")
    for i, (region, size) in enumerate(inputs):
        t = req.inputs.add(name=f"x{i}", datatype="UINT8", shape=[size])
        t.parameters["shared_memory_region"].string_param = region
        t.parameters["shared_memory_byte_size"].int64_param = size
    for i, (region, size) in enumerate(outputs):
        t = req.outputs.add(name=f"y{i}")
        t.parameters["shared_memory_region"].string_param = region
        t.parameters["shared_memory_byte_size"].int64_param = size
    return SharedCall(reg, "public", shared_memory_tensors(req.SerializeToString()))


def test_arenas_are_bounded_by_the_message_limit(shm):
    """A client's range can be far larger than any message (a sparse file in /dev/shm): an output arena is
    at most the message limit, an output larger than that is refused, and so is an input."""
    reg, make, root = shm
    reg.register("public", ME, "big", make("big", 8 * ARENA_GRAIN), 0, 8 * ARENA_GRAIN)
    inputs, outputs = Arenas(), Arenas(outputs=True)
    call = _shared_call(reg, outputs=[("big", 8 * ARENA_GRAIN)])
    try:
        call.prepare(inputs, outputs, max_bytes=2 * ARENA_GRAIN)
        assert [os.fstat(fd).st_size for fd in call.arena_fds] == [2 * ARENA_GRAIN]
        msg = refused(call.deliver, "m", [3 * ARENA_GRAIN]).message
        assert msg == (f"shared memory: output 'y0': {3 * ARENA_GRAIN} bytes, more than the largest message this "
                       f"daemon moves ({2 * ARENA_GRAIN} bytes)")
        worker_fd = os.open(f"/proc/self/fd/{call.arena_fds[0]}", os.O_RDWR)
        assert hop.fill_output_arena(worker_fd, b"out" * 10) == 30
        os.close(worker_fd)
        call.deliver("m", [30])
        assert (root / "big").read_bytes()[:30] == b"out" * 10
    finally:
        call.close()
    call = _shared_call(reg, inputs=[("big", 3 * ARENA_GRAIN)])
    try:
        msg = refused(call.prepare, inputs, outputs, 2 * ARENA_GRAIN).message
        assert msg == (f"shared memory: input 'x0': {3 * ARENA_GRAIN} bytes in region 'big', more than the largest "
                       f"message this daemon takes ({2 * ARENA_GRAIN} bytes)")
        assert call.arena_fds == []
    finally:
        call.close()
    inputs.close(), outputs.close()
    reg.close()


def test_an_output_the_worker_never_wrote_is_refused_and_allocates_nothing(shm):
    """A worker that reports 512 KiB of output it never wrote: copying those holes through the supervisor's
    mapping would allocate their pages for the root process. Refused, nothing allocated, nothing copied;
    the same size written whole is copied."""
    reg, make, root = shm
    reg.register("public", ME, "out", make("out", 4 * ARENA_GRAIN), 0, 4 * ARENA_GRAIN)
    before = (root / "out").read_bytes()
    outputs = Arenas(outputs=True)
    call = _shared_call(reg, outputs=[("out", 4 * ARENA_GRAIN)])
    try:
        call.prepare(Arenas(), outputs, max_bytes=4 * ARENA_GRAIN)
        fd = call.arena_fds[0]
        msg = refused(call.deliver, "m", [512 * 1024]).message
        assert msg == "model 'm' failed"
        assert os.fstat(fd).st_blocks == 0 and (root / "out").read_bytes() == before
        worker_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        assert hop.fill_output_arena(worker_fd, b"w" * (512 * 1024 - 1)) == 512 * 1024 - 1
        os.close(worker_fd)
        msg = refused(call.deliver, "m", [512 * 1024 + 4096]).message   # one page past what it wrote
        assert msg == "model 'm' failed" and os.fstat(fd).st_blocks * 512 == 512 * 1024
        call.deliver("m", [512 * 1024 - 1])
        assert (root / "out").read_bytes()[:512 * 1024] == b"w" * (512 * 1024 - 1) + before[512 * 1024 - 1:512 * 1024]
    finally:
        call.close()
    outputs.close()
    reg.close()


def test_an_arena_still_viewed_is_closed_without_error():
    """A failed copy's traceback can keep a view of an arena's mapping alive: closing it must still
    close its descriptor (and not raise, which stopped a call's clean-up before)."""
    arenas = Arenas()
    arena = arenas.take(10)
    view = memoryview(arena.mapping)[:5]
    arenas.close()
    arena.close()
    with pytest.raises(OSError):
        os.fstat(arena.fd)
    view.release()
