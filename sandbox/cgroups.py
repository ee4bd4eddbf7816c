"""A cgroup per worker: a memory limit, a process/thread limit, and one-shot kill.

Each controller (memory, pids) goes where this host offers it: cgroup v2 if
the unified hierarchy lists it in cgroup.controllers, else its cgroup v1
mount (/sys/fs/cgroup/<controller>). On hybrid hosts the worker also joins a
group in the v2 mount, without controllers, for `cgroup.kill`: one write
kills the whole tree.

Worker groups are created below the supervisor's own cgroup in each
hierarchy (<own>/sealbox/<name>), so the host's limits on the supervisor
still cover its workers.

A delegated cgroup v2 subtree (systemd's Delegate=yes; pure cgroup v2 hosts
such as Debian 12 and Ubuntu): cgroup v2 lets a non-root cgroup enable
controllers for its children only while it holds no process itself, and the
daemon's own cgroup holds the daemon. So, when memory or pids must come from
v2 and the daemon is the only process in its cgroup, the daemon first moves
itself into a leaf, <own>/supervisor, then enables the controllers in
<own>/cgroup.subtree_control; workers go to <own>/sealbox/<name>, beside the
leaf (`prepare_delegated_subtree`). Nothing happens in the root cgroup or on
hosts where v2 supplies no needed controller (hybrid hosts).

Attach a worker before it runs: call `attach_self()` from the launcher's
preexec_fn *before* dropping to the worker uid (moving a process needs root,
and Popen's own user= drop happens before preexec_fn), so bubblewrap and all
its children start inside the group.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time

ROOT = "/sys/fs/cgroup"
GROUP_DIR = "sealbox"               # <own cgroup>/sealbox/<worker name>
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
_CONTROLLERS = ("memory", "pids")
LEAF_DIR = "supervisor"             # <delegated cgroup>/supervisor holds the daemon itself
_prepare_lock = threading.Lock()


class CgroupError(Exception):
    """cgroups: a worker group cannot be set up or used (the message says why)."""


def _mounts() -> tuple[str | None, dict[str, str]]:
    """(cgroup2 mount point or None, {v1 controller: mount point}) from /proc/self/mounts."""
    v2, v1 = None, {}
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, point, fstype, options, *_ = line.split()
            if fstype == "cgroup2" and v2 is None:
                v2 = point
            elif fstype == "cgroup":
                for option in options.split(","):
                    if option in _CONTROLLERS:
                        v1[option] = point
    return v2, v1


# A cgroup file's errors once its group is removed (ENOENT), or while it is being removed (ENODEV).
_GONE = (errno.ENOENT, errno.ENODEV)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _own_cgroups() -> tuple[str, dict[str, str]]:
    """This process's cgroup paths: (v2 path, {v1 controller: path}), from /proc/self/cgroup."""
    v2, v1 = "/", {}
    for line in _read("/proc/self/cgroup").splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0":
            v2 = path
        for c in controllers.split(","):
            if c in _CONTROLLERS:
                v1[c] = path
    return v2, v1


def _kernel_has_cgroup_kill() -> bool:
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    return (major, minor) >= (5, 14)


def cgroup_support() -> dict:
    """What this host offers: where memory and pids limits would go, and how a tree is killed."""
    v2, v1 = _mounts()
    v2_controllers = _read(os.path.join(v2, "cgroup.controllers")).split() if v2 else []
    chosen = {}
    for c in _CONTROLLERS:
        chosen[c] = "v2" if c in v2_controllers else "v1" if c in v1 else None
    versions = {v for v in chosen.values() if v}
    memsw = "memory" in v1 and os.path.exists(os.path.join(v1["memory"], "memory.memsw.limit_in_bytes"))
    return {
        "version": ("hybrid" if v2 and "v1" in versions else "v2" if versions == {"v2"}
                    else "v1" if versions == {"v1"} else "none"),
        "v2_mount": v2,
        "v2_controllers": v2_controllers,
        "v1_mounts": {c: v1[c] for c in _CONTROLLERS if c in v1},
        "memory": chosen["memory"],
        "pids": chosen["pids"],
        "memsw": bool(chosen["memory"] == "v1" and memsw),
        "cgroup_kill": bool(v2) and _kernel_has_cgroup_kill(),
        "usable": all(chosen.values()),
    }


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _delegation_marked(path: str) -> bool:
    """systemd >= 251 marks a Delegate=yes cgroup with the xattr trusted.delegate=1."""
    for attr in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, attr).strip() == b"1":
                return True
        except OSError:
            pass
    return False


def _procs(path: str) -> set[int]:
    return {int(p) for p in _read(os.path.join(path, "cgroup.procs")).split()}


def _empty_group(pids_of, kill_file: str | None, timeout: float, what: str) -> None:
    """Kill every process of a group and wait until it is empty: one write to its cgroup.kill where
    it has one (atomic: forks cannot outrun it), else SIGKILL what is seen, again until nothing is left."""
    if kill_file:
        _write(kill_file, "1")
    deadline = time.monotonic() + timeout
    while pids := pids_of():
        if not kill_file:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            raise CgroupError(f"cgroups: processes {pids} of {what} survived SIGKILL for {timeout}s")
        time.sleep(0.01)


def prepare_delegated_subtree(controllers=None, mount: str | None = None) -> dict:
    """Make the daemon's own v2 cgroup able to give workers `controllers` (default: those this
    host supplies through v2). Returns {"base": the v2 cgroup (relative to the mount) that
    worker groups go under, "moved": whether the daemon moved itself into <base>/supervisor
    now, "delegated": whether the cgroup is marked delegated}. Idempotent.

    Raises CgroupError if the controllers are needed but the cgroup also holds other
    processes (the daemon never moves processes that are not its own)."""
    with _prepare_lock:
        if mount is None or controllers is None:
            support = cgroup_support()
            mount = support["v2_mount"] if mount is None else mount
            if controllers is None:
                controllers = [c for c in _CONTROLLERS if support[c] == "v2"]
        own = _own_cgroups()[0]
        result = {"base": own, "moved": False, "delegated": False}
        if not mount:
            return result
        own_dir = os.path.join(mount, own.lstrip("/"))
        if os.path.basename(own.rstrip("/")) == LEAF_DIR:  # moved before: the parent is the base
            base = os.path.dirname(own.rstrip("/")) or "/"
            result.update(base=base, delegated=_delegation_marked(os.path.join(mount, base.lstrip("/"))))
            return result
        result["delegated"] = _delegation_marked(own_dir)
        if not controllers or own == "/":  # the root cgroup may hold processes and enable controllers
            return result
        enabled = set(_read(os.path.join(own_dir, "cgroup.subtree_control")).split())
        if set(controllers) <= enabled:
            return result
        others = _procs(own_dir) - {os.getpid()}
        if others:
            raise CgroupError(
                f"cgroups: {own_dir} also holds processes {sorted(others)[:5]}: cgroup v2 cannot enable "
                f"{', '.join(controllers)} for workers there; run sealboxd in a cgroup of its own with "
                "delegation (systemd: Delegate=yes, see packaging/systemd/sealboxd.service)")
        leaf = os.path.join(own_dir, LEAF_DIR)
        try:
            os.makedirs(leaf, mode=0o755, exist_ok=True)
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        except OSError as exc:
            raise CgroupError(f"cgroups: cannot move the daemon into {leaf}: {exc.strerror}") from None
        wanted = " ".join("+" + c for c in controllers)
        try:
            _write(os.path.join(own_dir, "cgroup.subtree_control"), wanted)
        except OSError as exc:
            raise CgroupError(f"cgroups: cannot enable {wanted} in {own_dir}: {exc.strerror}") from None
        result["moved"] = True
        return result


def worker_group_parents(existing_only: bool = True) -> list[str]:
    """The <own>/sealbox directories that hold this process's worker groups, one per hierarchy in
    use (v2, and v1 memory/pids on hybrid hosts); by default only those that exist."""
    support = cgroup_support()
    own_v2, own_v1 = _own_cgroups()
    parents = []
    if support["v2_mount"]:
        base = own_v2.rstrip("/") or "/"
        if os.path.basename(base) == LEAF_DIR:   # the daemon in its leaf: workers beside it
            base = os.path.dirname(base) or "/"
        parents.append(os.path.join(support["v2_mount"], base.lstrip("/"), GROUP_DIR))
    for c in _CONTROLLERS:
        if support[c] == "v1":
            parents.append(os.path.join(support["v1_mounts"][c], own_v1.get(c, "/").lstrip("/"), GROUP_DIR))
    return [p for p in dict.fromkeys(parents) if not existing_only or os.path.isdir(p)]


def remove_stale_groups(is_stale, timeout: float = 5.0) -> list[str]:
    """Kill and remove the worker groups whose names `is_stale` picks (left by a daemon that died);
    returns the removed paths. Other groups are never touched."""
    removed = []
    for parent in worker_group_parents():
        for name in sorted(os.listdir(parent)):
            path = os.path.join(parent, name)
            if not os.path.isdir(path) or not is_stale(name):
                continue
            try:
                kill_file = os.path.join(path, "cgroup.kill")
                _empty_group(lambda: sorted(_procs(path)), kill_file if os.path.exists(kill_file) else None,
                             timeout, path)
                os.rmdir(path)
                removed.append(path)
            except OSError as exc:
                raise CgroupError(f"cgroups: cannot remove the stale group {path}: {exc.strerror}") from None
    return removed


class WorkerCgroup:
    """One worker's groups (up to three directories on hybrid hosts). Build with `create`."""

    def __init__(self, name: str, memory_dir: str, memory_version: str, pids_dir: str,
                 pids_version: str, v2_dir: str | None, created: list[str]):
        self.name = name
        self.memory_dir, self.memory_version = memory_dir, memory_version
        self.pids_dir, self.pids_version = pids_dir, pids_version
        self.v2_dir = v2_dir            # the unified group: cgroup.kill lives here
        self._created = created         # directories to remove, deepest last created
        dirs = dict.fromkeys(d for d in (memory_dir, pids_dir, v2_dir) if d)
        # Precomputed so attach_self (in a preexec_fn, after fork) allocates next to nothing.
        self._procs_files = tuple(os.path.join(d, "cgroup.procs") for d in dirs)

    @classmethod
    def create(cls, name: str, memory_bytes: int, pids_max: int) -> "WorkerCgroup":
        """Make <own>/sealbox/<name> in each needed hierarchy and set the limits."""
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise CgroupError(f"cgroups: worker group name {name!r} must match {_NAME.pattern}")
        if memory_bytes <= 0 or pids_max <= 0:
            raise CgroupError("cgroups: memory_bytes and pids_max must be positive")
        support = cgroup_support()
        if not support["usable"]:
            missing = [c for c in _CONTROLLERS if not support[c]]
            raise CgroupError(f"cgroups: controller(s) {', '.join(missing)} available in neither cgroup v2 "
                              "nor cgroup v1 on this host")
        own_v2, own_v1 = _own_cgroups()
        v2_mount = support["v2_mount"]
        v2_needs = [c for c in _CONTROLLERS if support[c] == "v2"]
        if v2_mount:  # a delegated v2 subtree: the daemon in a leaf, workers beside it
            own_v2 = prepare_delegated_subtree(v2_needs, v2_mount)["base"]
        created: list[str] = []
        group = None
        try:
            dirs = {}
            if v2_mount:
                dirs["v2"] = cls._make(v2_mount, own_v2, name, v2_needs, created)
            for c in _CONTROLLERS:
                if support[c] == "v1":
                    mount = support["v1_mounts"][c]
                    dirs[c] = cls._make(mount, own_v1.get(c, "/"), name, [], created)
                else:
                    dirs[c] = dirs["v2"]
            group = cls(name, dirs["memory"], support["memory"], dirs["pids"], support["pids"],
                        dirs.get("v2") if support["cgroup_kill"] else None, created)
            group._set_limits(memory_bytes, pids_max)
            return group
        except BaseException:
            for d in reversed(created):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            raise

    @staticmethod
    def _make(mount: str, own: str, name: str, controllers: list[str], created: list[str]) -> str:
        """mount/own/sealbox/name, enabling controllers on the way down (v2)."""
        base = os.path.join(mount, own.lstrip("/"))
        parent = os.path.join(base, GROUP_DIR)
        for where, path in ((base, parent), (parent, os.path.join(parent, name))):
            if controllers:
                wanted = " ".join("+" + c for c in controllers)
                try:
                    _write(os.path.join(where, "cgroup.subtree_control"), wanted)
                except OSError as exc:
                    hint = (" (the supervisor's own cgroup holds processes; run it in a delegated cgroup "
                            "with a leaf for itself)" if exc.errno == errno.EBUSY else "")
                    raise CgroupError(f"cgroups: cannot enable {wanted} in {where}: {exc.strerror}{hint}") from None
            try:
                os.mkdir(path, 0o755)
                if path != parent:
                    created.append(path)
            except FileExistsError:
                if path != parent:
                    try:  # a stale empty group from an earlier run: reuse nothing, start clean
                        os.rmdir(path)
                        os.mkdir(path, 0o755)
                        created.append(path)
                    except OSError as exc:
                        raise CgroupError(f"cgroups: {path} exists and cannot be replaced: {exc.strerror}") from None
            except OSError as exc:
                raise CgroupError(f"cgroups: cannot create {path}: {exc.strerror}") from None
        return os.path.join(parent, name)

    def set_limits(self, memory_bytes: int, pids_max: int) -> None:
        """The model's limits, for a warm-pool worker once its model is known (before it reads a byte)."""
        self._set_limits(memory_bytes, pids_max)

    def _set_limits(self, memory_bytes: int, pids_max: int) -> None:
        if self.memory_version == "v2":
            _write(os.path.join(self.memory_dir, "memory.max"), str(memory_bytes))
            swap = os.path.join(self.memory_dir, "memory.swap.max")
            if os.path.exists(swap):  # memory.max alone would let the worker swap past the limit
                _write(swap, "0")
            _write(os.path.join(self.memory_dir, "memory.oom.group"), "1")  # an OOM kills the whole worker
        else:
            _write(os.path.join(self.memory_dir, "memory.limit_in_bytes"), str(memory_bytes))
            memsw = os.path.join(self.memory_dir, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):  # memory + swap: without it the worker could swap past the limit
                _write(memsw, str(memory_bytes))
        _write(os.path.join(self.pids_dir, "pids.max"), str(pids_max))

    def attach(self, pid: int) -> None:
        """Move pid (0: the calling process) into every group of this worker."""
        for path in self._procs_files:
            try:
                _write(path, str(pid))
            except OSError as exc:
                raise CgroupError(f"cgroups: cannot move pid {pid} into {path}: {exc.strerror}") from None

    def attach_self(self) -> None:
        """For a preexec_fn (as root, before the uid drop): move the calling process in."""
        for path in self._procs_files:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    def pids(self) -> list[int]:
        """Every process in the worker's groups (none in a group that is gone or being removed)."""
        found: set[int] = set()
        for path in self._procs_files:
            try:
                found.update(int(p) for p in _read(path).split())
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
        return sorted(found)

    def kill(self, timeout: float = 5.0) -> None:
        """Kill every process of the worker and wait until the groups are empty. A group removed
        meanwhile (the worker's watcher cleans up once it has reaped the worker) is empty: done."""
        try:
            _empty_group(self.pids, os.path.join(self.v2_dir, "cgroup.kill") if self.v2_dir else None, timeout,
                         f"worker {self.name}")
        except OSError as exc:
            if exc.errno not in _GONE:
                raise

    def _counter(self, path: str, key: str) -> int | None:
        try:
            text = _read(path)
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return None

    def memory_usage(self) -> int | None:
        """Bytes the worker uses now (memory.current, v1: memory.usage_in_bytes); None if gone."""
        name = "memory.current" if self.memory_version == "v2" else "memory.usage_in_bytes"
        try:
            return int(_read(os.path.join(self.memory_dir, name)).strip())
        except (FileNotFoundError, ValueError):
            return None

    def memory_limit(self) -> int | None:
        """The memory limit in bytes (memory.max, v1: memory.limit_in_bytes); None if unlimited or gone."""
        name = "memory.max" if self.memory_version == "v2" else "memory.limit_in_bytes"
        try:
            return int(_read(os.path.join(self.memory_dir, name)).strip())
        except (FileNotFoundError, ValueError):
            return None

    def oom_killed(self) -> bool:
        """Did the kernel's OOM killer kill a process of this worker for the memory limit?"""
        if self.memory_version == "v2":
            count = self._counter(os.path.join(self.memory_dir, "memory.events"), "oom_kill")
        else:
            count = self._counter(os.path.join(self.memory_dir, "memory.oom_control"), "oom_kill")
        return bool(count)

    def pids_limit_hit(self) -> bool | None:
        """Was a fork or thread refused by pids.max? None if the kernel does not say."""
        count = self._counter(os.path.join(self.pids_dir, "pids.events"), "max")
        return None if count is None else count > 0

    def remove(self, timeout: float = 5.0) -> None:
        """Remove the worker's groups (kill first if anything may still run)."""
        deadline = time.monotonic() + timeout
        for d in reversed(self._created):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:  # EBUSY right after the last process exits
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cgroups: cannot remove {d}: {exc.strerror}") from None
                    time.sleep(0.01)
        self._created = []
