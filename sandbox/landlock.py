"""Landlock: the worker restricts its own filesystem, TCP and signal/abstract-socket reach.

Raw syscalls through ctypes (no library covers network rules and scopes).
A ruleset handles every access right the running kernel's ABI knows, so all
of them are denied except what a rule grants beneath the given paths:
read-only paths get file reading and directory listing, read-write paths
also creating, writing, truncating and removing files and Unix sockets.
Nothing is executable: the worker never execs once confined.

Landlock applies to the calling thread (and its future threads) only, so
`restrict_self` refuses to run in a process that already has other threads:
they would stay unconfined and share the worker's memory.
"""
from __future__ import annotations

import ctypes
import os
import platform
import stat

# Syscall numbers: the same on every architecture (asm-generic), 444-446.
_NR_CREATE_RULESET, _NR_ADD_RULE, _NR_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights (include/uapi/linux/landlock.h), with the ABI that introduced them.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13          # ABI 2
FS_TRUNCATE = 1 << 14       # ABI 3
FS_IOCTL_DEV = 1 << 15      # ABI 5
NET_BIND_TCP = 1 << 0       # ABI 4
NET_CONNECT_TCP = 1 << 1    # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1                # ABI 6

# Every filesystem right each ABI can handle (ABI 7 added only logging flags).
_FS_HANDLED = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1,
               5: (1 << 16) - 1, 6: (1 << 16) - 1, 7: (1 << 16) - 1}
_MAX_KNOWN_ABI = max(_FS_HANDLED)
# Rights that a rule on a non-directory may carry (others: EINVAL).
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

READ_ONLY = FS_READ_FILE | FS_READ_DIR
READ_WRITE = (READ_ONLY | FS_WRITE_FILE | FS_TRUNCATE | FS_REMOVE_FILE | FS_REMOVE_DIR
              | FS_MAKE_REG | FS_MAKE_DIR | FS_MAKE_SOCK)
# A directory on the host that holds only the worker's socket: bind it (and unlink a stale one),
# nothing else, so a worker cannot fill the host filesystem with regular files.
SOCKET_ONLY = FS_MAKE_SOCK | FS_REMOVE_FILE


class LandlockError(Exception):
    """landlock: the restriction cannot be applied (the message says why)."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _syscall(libc, nr: int, *args) -> int:
    result = libc.syscall(ctypes.c_long(nr), *args)
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 if Landlock is unsupported or disabled."""
    if platform.system() != "Linux":
        return 0
    try:
        return _syscall(_libc(), _NR_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except OSError:  # ENOSYS (not built in) or EOPNOTSUPP (not enabled at boot)
        return 0


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def restrict_self(read_only: list[str], read_write: list[str], deny_tcp: bool = True,
                  scope_signals_and_abstract_unix: bool = True, socket_dirs: list[str] = (),
                  symlink_dirs: list[str] = ()) -> int:
    """Confine this process for good; returns the Landlock ABI the ruleset was built for.

    deny_tcp needs ABI 4 and scope_signals_and_abstract_unix ABI 6: asking for
    them on an older kernel is an error, not a silent downgrade.
    """
    abi = abi_version()
    if abi == 0:
        raise LandlockError("landlock: not supported or not enabled by this kernel "
                            "(needs CONFIG_SECURITY_LANDLOCK and 'landlock' in the lsm= boot list)")
    if deny_tcp and abi < 4:
        raise LandlockError(f"landlock: ABI {abi} cannot deny TCP bind/connect (needs ABI 4)")
    if scope_signals_and_abstract_unix and abi < 6:
        raise LandlockError(f"landlock: ABI {abi} cannot scope signals and abstract Unix sockets (needs ABI 6)")
    threads = _thread_count()
    if threads != 1:
        raise LandlockError(f"landlock: {threads} threads run already; Landlock confines only the calling "
                            "thread, so restrict before any thread starts (e.g. before importing numpy)")
    handled_fs = _FS_HANDLED[min(abi, _MAX_KNOWN_ABI)]
    attr = _RulesetAttr(handled_fs, NET_BIND_TCP | NET_CONNECT_TCP if deny_tcp else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if scope_signals_and_abstract_unix else 0)
    # The kernel reads only the fields the given size covers: scopes need 24 bytes, net 16.
    size = 24 if scope_signals_and_abstract_unix else 16 if deny_tcp else 8
    libc = _libc()
    try:
        ruleset_fd = _syscall(libc, _NR_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                              ctypes.c_uint32(0))
    except OSError as exc:
        raise LandlockError(f"landlock: landlock_create_ruleset failed: {exc.strerror}") from None
    try:
        for paths, rights in ((read_only, READ_ONLY), (read_write, READ_WRITE), (socket_dirs, SOCKET_ONLY),
                              (symlink_dirs, FS_MAKE_SYM)):   # rules on one path add up
            for path in paths:
                _add_path_rule(libc, ruleset_fd, path, rights & handled_fs)
        if ctypes.CDLL(None).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise LandlockError("landlock: prctl(PR_SET_NO_NEW_PRIVS) failed")
        try:
            _syscall(libc, _NR_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))
        except OSError as exc:
            raise LandlockError(f"landlock: landlock_restrict_self failed: {exc.strerror}") from None
    finally:
        os.close(ruleset_fd)
    return abi


def _add_path_rule(libc, ruleset_fd: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise LandlockError(f"landlock: cannot open {path!r} for a rule: {exc.strerror}") from None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS  # directory rights on a file are EINVAL
        rule = _PathBeneathAttr(rights, fd)
        try:
            _syscall(libc, _NR_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(_RULE_PATH_BENEATH),
                     ctypes.byref(rule), ctypes.c_uint32(0))
        except OSError as exc:
            raise LandlockError(f"landlock: rule for {path!r} refused: {exc.strerror}") from None
    finally:
        os.close(fd)
