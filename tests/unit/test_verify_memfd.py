"""The verified bytes are the loaded bytes: sealed memfds survive a swap on disk."""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys

import pytest

from tests.support.pki import make_model, open_fds, write_key  # noqa: E402

from sealbox.client import publisher as publisher_cli  # noqa: E402
from sealbox.daemon.config import policy_from_toml  # noqa: E402
from sealbox.proto.contract import MEMFD_SEALS as SEALS  # noqa: E402
from sealbox.trust import VerificationError, verify_model  # noqa: E402
from sealbox.trust._hashing import hash_into_memfds  # noqa: E402
from sealbox.trust._storage import open_tree  # noqa: E402


@pytest.fixture
def verified(tmp_path):
    key, pub = write_key(tmp_path / "k.pem")
    original = os.urandom(64 << 10)
    model = make_model(tmp_path / "m", {"weights.safetensors": original, "config.json": b"{}"})
    assert publisher_cli.main(["sign", "key", str(model), "--private-key", str(key)]) == 0
    pol = policy_from_toml({"sources": [str(tmp_path)], "public_keys": [str(pub)]}, "t")
    vm = verify_model("m", str(model), pol, None, None)
    yield vm, model / "weights.safetensors", original
    vm.close()


def test_swap_after_verify_does_not_reach_the_memfd(verified):
    vm, path, original = verified
    fd = vm.files["weights.safetensors"]
    # Overwrite the file on disk in place (same inode), as an attacker would.
    with open(path, "r+b") as f:
        f.write(b"\xEE" * len(original))
    assert path.read_bytes() != original
    assert os.pread(fd, len(original) + 1, 0) == original
    # The path a worker reads, in another process that inherited the fd.
    child = subprocess.run(
        [sys.executable, "-c", "import sys, hashlib; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
         f"/proc/self/fd/{fd}"], pass_fds=(fd,), capture_output=True, text=True, check=True)
    import hashlib
    assert child.stdout.strip() == hashlib.sha256(original).hexdigest()


def test_memfds_are_sealed_and_cloexec(verified):
    vm, _, original = verified
    fd = vm.files["weights.safetensors"]
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == SEALS
    assert not os.get_inheritable(fd)
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 1)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, len(original) + 4096)
    # Writable through /proc either? No: the seal covers every open file.
    with pytest.raises(PermissionError):
        with open(f"/proc/self/fd/{fd}", "r+b") as f:
            f.write(b"x")
    with pytest.raises(OSError) as info:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)
    assert info.value.errno == errno.EPERM
    assert os.pread(fd, len(original) + 1, 0) == original


def test_close_is_idempotent_and_closes_the_fds(verified):
    vm, _, _ = verified
    fds = list(vm.files.values())
    vm.close()
    vm.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_file_shorter_than_checked_is_refused(tmp_path):
    # The size fstat saw is what we hash; a file that shrinks meanwhile is refused.
    (tmp_path / "a.bin").write_bytes(b"x" * 5000)
    tree = open_tree(str(tmp_path), set(), strict=False)
    try:
        os.truncate(tmp_path / "a.bin", 1000)
        before = open_fds()
        with pytest.raises(VerificationError) as info:
            hash_into_memfds(list(tree.files.values()), "sha256")
        assert str(info.value) == f"{tmp_path}/a.bin: storage: shrank while being hashed (expected 5000 bytes)"
        assert open_fds() == before
    finally:
        tree.close()


def test_a_file_longer_than_checked_is_refused(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 5000)
    tree = open_tree(str(tmp_path), set(), strict=False)
    try:
        with open(tmp_path / "a.bin", "ab") as f:
            f.write(b"more")
        with pytest.raises(VerificationError) as info:
            hash_into_memfds(list(tree.files.values()), "sha256")
        assert str(info.value) == f"{tmp_path}/a.bin: storage: grew while being hashed (expected 5000 bytes)"
    finally:
        tree.close()
