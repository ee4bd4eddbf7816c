"""Triton's system shared-memory extension: regions of /dev/shm that a local client registers by name.

A client creates a POSIX shared-memory object (`/dev/shm/KEY`, e.g. with tritonclient.utils.
shared_memory), registers `name -> (key, offset, byte_size)` with SystemSharedMemoryRegister, and then
names the region in an input's or a requested output's parameters (`shared_memory_region`,
`shared_memory_byte_size`, `shared_memory_offset`) instead of sending the bytes.

Who may register (grpcio exposes no peer uid, so the listener is the identity): a listener's
configuration lists the uids whose regions it accepts (`shared_memory_owners`); a region file owned
by any other uid is refused, and a listener with no owners refuses every registration. Regions live
in the registering listener's own namespace: a caller on another listener can neither use, see nor
unregister them.

The root supervisor never maps a client's region. A client can truncate its region at any time, and a
mapped page past the end of a file raises SIGBUS, which would kill the supervisor: it uses pread and
pwrite on the region's descriptor only (a short read is the client's error; a write past the end
just grows the file). The worker never receives a descriptor of a client's region at all: inputs
reach it as a copy in one of its input arenas (copy_input), and it writes outputs into output arenas,
from which the supervisor copies them once into the client's range (write_output).

Arenas (Arenas, one set for inputs and one for outputs per worker, kept while it lives): memfds the
supervisor makes, maps once and reuses call after call. An input arena is mapped writable, then sealed
(contract.ARENA_SEALS: no other writer, no size change); an output arena is sealed against size changes
and mapped read-only: the worker writes its output into it and says how many bytes it has. A fresh
memfd per tensor cost ~50 ms per 64 MiB here, nearly all of it the kernel allocating and zeroing new
pages; a copy into an arena's warm pages ~12 ms. What the reuse shows a worker is what it was sent or
wrote anyway: an arena serves only that worker, only once its previous call has ended; the worker maps
exactly an input's size (the side data's SHM_SIZE), and an output's copy stops at the size it gives, so
an earlier call's bytes past them are never part of a call; a compromised worker that reads or reports
more sees only its own earlier inputs and outputs. An output is copied only once no page of it is a hole
(`deliver`): the supervisor's mapping would allocate a hole's page for the root process.
"""
from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os
import re
import stat
import threading
import time

from ..proto import hop
from ..proto.contract import ARENA_SEALS, SIZE_SEALS
from . import errors
from .errors import ClientError

SHM_DIR = "/dev/shm"
MAX_REGIONS_PER_LISTENER = 64
ARENA_GRAIN = 1 << 20                # arenas are sized in MiB steps (pages never touched cost nothing)
MAX_FREE_ARENA_BYTES = 128 << 20     # arena capacity a worker keeps between calls; beyond, closed on return
ARENA_IDLE_S = 30.0                  # a free arena unused this long is closed (Arenas.trim)
# A POSIX shm name as tritonclient passes it: "/name" or "name", one path component.
_KEY = re.compile(r"/?([A-Za-z0-9_.-]{1,200})")
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

SC = errors.SC


def _refuse(code, text: str) -> ClientError:
    return ClientError(code, f"shared memory: {text}")


@dataclasses.dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int             # O_RDWR, CLOEXEC; pread/pwrite only, never mapped here
    owner: int
    users: int = 0      # calls using the region right now
    dropped: bool = False

    def check_range(self, offset: int, size: int, what: str) -> int:
        """The absolute file offset of [offset, offset + size) inside this region; refuse what leaves it."""
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise _refuse(SC.INVALID_ARGUMENT, f"{what}: bytes [{offset}, {offset + size}) are outside region"
                                               f" '{self.name}' of {self.byte_size} bytes")
        return self.offset + offset


class SharedMemoryRegistry:
    def __init__(self, shm_dir: str = SHM_DIR, max_regions: int = MAX_REGIONS_PER_LISTENER):
        self.shm_dir, self.max_regions = shm_dir, max_regions
        self._regions: dict[tuple[str, str], Region] = {}
        self._lock = threading.Lock()

    # -- the three RPCs ---------------------------------------------------------------------------
    def register(self, listener: str, owners: frozenset[int], name: str, key: str, offset: int,
                 byte_size: int) -> Region:
        if not owners:
            raise _refuse(SC.PERMISSION_DENIED, "this listener accepts no shared-memory regions"
                                                " (its configuration lists no shared_memory_owners)")
        if not _NAME.fullmatch(name):
            raise _refuse(SC.INVALID_ARGUMENT, "a region name is 1-128 letters, digits or _.:-")
        m = _KEY.fullmatch(key)
        if m is None or m.group(1) in (".", ".."):
            raise _refuse(SC.INVALID_ARGUMENT, "the key must name one shared-memory object (\"/name\")")
        if byte_size <= 0:
            raise _refuse(SC.INVALID_ARGUMENT, "byte_size must be positive")
        # The file is first only looked at (O_PATH: not opened for reading or writing, so another user's
        # file sees no open, lease break or inotify event from root), then reopened read-write through
        # that same descriptor once it is known to be a regular file of an accepted owner.
        try:
            dir_fd = os.open(self.shm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                path_fd = os.open(m.group(1), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            raise _refuse(SC.INVALID_ARGUMENT, f"cannot open shared-memory object '{m.group(1)}'") from None
        try:
            st = os.fstat(path_fd)
            if not stat.S_ISREG(st.st_mode):
                raise _refuse(SC.INVALID_ARGUMENT, f"'{m.group(1)}' is not a shared-memory object")
            if st.st_uid not in owners:
                raise _refuse(SC.PERMISSION_DENIED, f"'{m.group(1)}' is owned by a user this listener does"
                                                    " not accept regions from")
            try:
                fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                raise _refuse(SC.INVALID_ARGUMENT, f"cannot open shared-memory object '{m.group(1)}'") from None
        finally:
            os.close(path_fd)
        try:
            if offset < 0 or offset + byte_size > st.st_size:
                raise _refuse(SC.INVALID_ARGUMENT, f"[{offset}, {offset + byte_size}) is outside '{m.group(1)}'"
                                                   f" ({st.st_size} bytes)")
            region = Region(name, "/" + m.group(1), offset, byte_size, fd, st.st_uid)
            with self._lock:
                if (listener, name) in self._regions:
                    raise _refuse(SC.ALREADY_EXISTS, f"region '{name}' is already registered")
                if sum(1 for (lst, _) in self._regions if lst == listener) >= self.max_regions:
                    raise _refuse(SC.RESOURCE_EXHAUSTED, f"at most {self.max_regions} regions per listener")
                self._regions[(listener, name)] = region
            return region
        except BaseException:
            os.close(fd)
            raise

    def status(self, listener: str, name: str) -> list[Region]:
        with self._lock:
            if name:
                region = self._regions.get((listener, name))
                if region is None:
                    raise _refuse(SC.NOT_FOUND, f"no region '{name}' is registered")
                return [region]
            return [r for (lst, _), r in self._regions.items() if lst == listener]

    def unregister(self, listener: str, name: str) -> None:
        """One region, or every region of this listener when name is empty (as Triton does)."""
        with self._lock:
            keys = [k for k in self._regions if k[0] == listener and (not name or k[1] == name)]
            regions = [self._regions.pop(k) for k in keys]
        for region in regions:
            self._drop(region)

    def close(self) -> None:
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for region in regions:
            self._drop(region)

    # -- use by one call --------------------------------------------------------------------------
    def acquire(self, listener: str, name: str) -> Region:
        with self._lock:
            region = self._regions.get((listener, name))
            if region is None:
                raise _refuse(SC.INVALID_ARGUMENT, f"no region '{name}' is registered")
            region.users += 1
            return region

    def release(self, region: Region) -> None:
        with self._lock:
            region.users -= 1
            close = region.dropped and region.users == 0
        if close:
            os.close(region.fd)

    def _drop(self, region: Region) -> None:
        with self._lock:
            region.dropped = True
            close = region.users == 0
        if close:
            os.close(region.fd)


@dataclasses.dataclass(eq=False)
class Arena:
    fd: int
    mapping: mmap.mmap    # the supervisor's own mapping: writable for inputs (made before sealing), read-only for outputs
    capacity: int
    freed_at: float = 0.0   # time.monotonic() when last given back

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:   # a view still exported (say, held by a failed copy's traceback): unmapped once it goes
            pass
        finally:
            os.close(self.fd)


class Arenas:
    """One worker's reusable memfds for shared-memory inputs (and large request bodies: worker_hop.py),
    or for its outputs (see the module's docstring). take() on a copying thread, give() once the call has ended at the worker, close() when
    the worker's hop closes.

    Input arenas are sealed with contract.ARENA_SEALS after the supervisor maps them writable: only that
    mapping ever writes them. Output arenas are sealed against size changes only: the worker writes its
    output into them; the supervisor maps them read-only and copies what the worker says it wrote
    (never past the arena's fixed end, so a worker cannot make the root process fault)."""

    def __init__(self, outputs: bool = False, max_free_bytes: int = MAX_FREE_ARENA_BYTES):
        self.outputs, self.max_free_bytes = outputs, max_free_bytes
        self._free: list[Arena] = []
        self._lock = threading.Lock()
        self.closed = False

    def take(self, size: int, most: int | None = None) -> Arena:
        """A free arena of at least `size` bytes, or a new one; `most` caps a new one's capacity, even
        below `size` (an output arena: what does not fit is refused when the worker reports it)."""
        with self._lock:
            fits = [a for a in self._free if a.capacity >= size]
            if fits:
                best = min(fits, key=lambda a: a.capacity)
                self._free.remove(best)
                return best
        capacity = max(ARENA_GRAIN, -(-size // ARENA_GRAIN) * ARENA_GRAIN)
        if most is not None:
            capacity = min(capacity, most)
        name = "sealbox-shm-output" if self.outputs else "sealbox-shm-input"
        fd, mapping = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING), None
        try:
            os.ftruncate(fd, capacity)
            if self.outputs:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
                mapping = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            else:
                mapping = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ARENA_SEALS)   # after the mapping: it stays the only writer
        except BaseException:
            if mapping is not None:
                mapping.close()
            os.close(fd)
            raise
        return Arena(fd, mapping, capacity)

    def give(self, arena: Arena) -> None:
        """Back to the free list. Beyond max_free_bytes the arenas given back longest ago are closed: the
        sizes the worker's calls use now are the ones worth keeping (keeping the old ones instead made a
        64 MiB call after shared-memory calls allocate fresh arenas every time)."""
        with self._lock:
            if self.closed or arena.capacity > self.max_free_bytes:
                evicted = [arena]
            else:
                arena.freed_at = time.monotonic()
                self._free.append(arena)   # in the order given back
                evicted = []
                while sum(a.capacity for a in self._free) > self.max_free_bytes:
                    evicted.append(self._free.pop(0))
        for old in evicted:
            old.close()

    def trim(self, idle_s: float = ARENA_IDLE_S) -> bool:
        """Close the free arenas unused for idle_s seconds (their pages are the supervisor's memory);
        True while some are still kept."""
        now = time.monotonic()
        with self._lock:
            stale = [a for a in self._free if now - a.freed_at >= idle_s]
            self._free = [a for a in self._free if a not in stale]
            kept = bool(self._free)
        for arena in stale:
            arena.close()
        return kept

    def close(self) -> None:
        with self._lock:
            self.closed = True
            free, self._free = self._free, []
        for arena in free:
            arena.close()


def copy_input(region: Region, offset: int, size: int, what: str, arena: Arena) -> None:
    """Copy [offset, offset + size) of the client's region into the start of the arena: preadv from the
    region's descriptor into the supervisor's own mapping (never a mapping of the client's region)."""
    start = region.check_range(offset, size, what)
    view, done = memoryview(arena.mapping), 0
    try:
        while done < size:
            n = os.preadv(region.fd, [view[done:size]], start + done)
            if n <= 0:   # a short read: the client truncated its region
                raise _refuse(SC.INVALID_ARGUMENT, f"{what}: region '{region.name}' is shorter than"
                                                   " registered (truncated by its owner)")
            done += n
    finally:
        view.release()


def write_output(region: Region, offset: int, data, what: str) -> None:
    """Copy an output's bytes (a buffer, e.g. a read-only mapping of the worker's sealed memfd) into
    the client's range: pwrite only, so a truncated region cannot raise SIGBUS here."""
    start = region.check_range(offset, len(data), what)
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(region.fd, view[done:], start + done)


def _int_parameter(parameters, key: str, default: int | None) -> int | None:
    if key not in parameters:
        return default
    p = parameters[key]
    kind = p.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise _refuse(SC.INVALID_ARGUMENT, f"parameter '{key}' must be an integer")
    return getattr(p, kind)


class SharedCall:
    """The shared-memory tensors of one ModelInfer call, between the front door and the worker hop.

    Made from the name and parameters of the request's tensors that name a region
    (wire.shared_memory_tensors: only those fields are decoded here, on the event loop); holds
    each region (acquire/release) for the call's lifetime. `prepare()` copies the inputs into the
    chosen worker's arenas and takes its output arenas (`arena_fds` and `arena_sizes`, as proto/hop.py
    SHM expects them); `deliver()` copies the outputs from their arenas into the clients' ranges;
    `close()`, once the call has ended at the worker, lets everything go."""

    def __init__(self, registry: SharedMemoryRegistry, listener: str, refs: list[tuple[int, int, bytes]]):
        from ..proto import inference_pb2 as pb
        from ..proto.wire import INFER_REQUEST_INPUTS
        self.registry = registry
        self.inputs: list[tuple[Region, int, int, str]] = []    # region, offset, size, what
        self.outputs: list[tuple[Region, int, int, str]] = []
        self._in: list[Arena] = []
        self._out: list[Arena] = []
        self._pools: tuple[Arenas, Arenas] | None = None
        self._max_bytes = 0
        if sum(field == INFER_REQUEST_INPUTS for field, _, _ in refs) > 16 or \
                sum(field != INFER_REQUEST_INPUTS for field, _, _ in refs) > 16:   # proto/hop.py MAX_SHM_FDS
            raise _refuse(SC.INVALID_ARGUMENT, "at most 16 inputs and 16 outputs may name shared memory")
        try:
            for field, _index, message in refs:
                kind = pb.ModelInferRequest.InferInputTensor if field == INFER_REQUEST_INPUTS else \
                    pb.ModelInferRequest.InferRequestedOutputTensor
                try:
                    tensor = kind.FromString(message)
                except Exception:
                    raise _refuse(SC.INVALID_ARGUMENT, "malformed tensor in the request") from None
                what = f"{'input' if field == INFER_REQUEST_INPUTS else 'output'} '{errors.clean(tensor.name, 64)}'"
                region_name = tensor.parameters["shared_memory_region"].string_param \
                    if "shared_memory_region" in tensor.parameters else ""
                if not region_name:   # the bytes matched, the parameter is not there (or not a string)
                    if "shared_memory_region" in tensor.parameters:
                        raise _refuse(SC.INVALID_ARGUMENT, f"{what}: shared_memory_region must name a region")
                    continue
                size = _int_parameter(tensor.parameters, "shared_memory_byte_size", None)
                if size is None:
                    raise _refuse(SC.INVALID_ARGUMENT, f"{what}: shared_memory_byte_size is required")
                offset = _int_parameter(tensor.parameters, "shared_memory_offset", 0)
                region = registry.acquire(listener, region_name)
                target = self.inputs if field == INFER_REQUEST_INPUTS else self.outputs
                target.append((region, offset, size, what))
                region.check_range(offset, size, what)
        except BaseException:
            self.close()
            raise

    @property
    def input_bytes(self) -> int:
        return sum(size for _, _, size, _ in self.inputs)

    @property
    def arena_fds(self) -> list[int]:
        """The arenas' descriptors, inputs then outputs, each in request order (proto/hop.py SHM)."""
        return [arena.fd for arena in self._in + self._out]

    @property
    def arena_sizes(self) -> list[int]:
        """The matching SHM_SIZE entries: each input's byte size, then hop.OUTPUT_ARENA per output."""
        return [size for _, _, size, _ in self.inputs] + [hop.OUTPUT_ARENA] * len(self._out)

    def prepare(self, inputs: Arenas, outputs: Arenas, max_bytes: int) -> None:
        """Copy the inputs into arenas of the worker's `inputs` pool and take an arena from `outputs`
        for each output, as large as the range the client gave it but at most `max_bytes`, the largest
        message the worker may send (blocking: run it off the event loop)."""
        self._max_bytes = max_bytes
        for region, _offset, size, what in self.inputs:
            if size > max_bytes:
                raise _refuse(SC.INVALID_ARGUMENT, f"{what}: {size} bytes in region '{region.name}', more than "
                                                   f"the largest message this daemon takes ({max_bytes} bytes)")
        self._pools = (inputs, outputs)
        for region, offset, size, what in self.inputs:
            self._in.append(inputs.take(size))
            copy_input(region, offset, size, what, self._in[-1])
        for _region, _offset, size, _what in self.outputs:
            self._out.append(outputs.take(size, most=max_bytes))

    def deliver(self, model: str, sizes: list[int]) -> None:
        """Copy each output, `sizes[i]` bytes from the start of its arena as the worker reported them,
        into its range (blocking). A worker that reported the wrong number of outputs failed; an output
        larger than its range is the client's error, as in Triton."""
        if len(sizes) != len(self.outputs):
            raise errors.model_failed(model)
        for (region, offset, size, what), arena, n in zip(self.outputs, self._out, sizes):
            if n > size:
                raise _refuse(SC.INVALID_ARGUMENT, f"{what}: {n} bytes do not fit the {size} bytes given "
                                                   f"in region '{region.name}'")
            if n > arena.capacity:   # the worker could not write it (its arena is at most max_bytes)
                raise _refuse(SC.INVALID_ARGUMENT, f"{what}: {n} bytes, more than the largest message this "
                                                   f"daemon moves ({self._max_bytes} bytes)")
            if n and os.lseek(arena.fd, 0, os.SEEK_HOLE) < n:
                # A page the worker says it wrote and never did: copied through the mapping, it would be
                # allocated for the root process. (A written page stays: the worker's seccomp filter has
                # neither fallocate nor madvise(MADV_REMOVE) to punch it out again while this copies.)
                raise errors.model_failed(model)
            with memoryview(arena.mapping) as view:
                write_output(region, offset, view[:n], what)

    def close(self) -> None:
        """Give the arenas back (once the call has ended at the worker) and let the regions go."""
        while self._in:
            self._pools[0].give(self._in.pop())
        while self._out:
            self._pools[1].give(self._out.pop())
        for region, *_ in self.inputs + self.outputs:
            self.registry.release(region)
        self.inputs, self.outputs = [], []
