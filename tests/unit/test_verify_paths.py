"""One trust decision, two places for the bytes: verify_model(seal=True) copies what it hashes into
sealed memfds (the daemon), seal=False only hashes (`sealbox verify`). Both read the same bytes, give
the same digests and the same verdict, and neither keeps its buffers after the call."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap

import pytest

from tests.support.pki import make_model, open_fds, run, write_key

from sealbox.daemon.config import policy_from_toml
from sealbox.proto.contract import MEMFD_SEALS
from sealbox.trust import VerificationError, verify_model
from sealbox.trust._hashing import CHUNK, hash_into_memfds
from sealbox.trust._storage import open_tree

SERIALIZATIONS = {
    "files-sha256": "use_file_serialization(hashing_algorithm='sha256')",
    "files-blake3": "use_file_serialization(hashing_algorithm='blake3')",
    # Shards not aligned with the read chunk: ranges start and end inside a chunk. (Asked for
    # blake3 shards, upstream writes blake3 files serialization; its blake2 shards are shards.)
    "shards-sha256": "use_shard_serialization(hashing_algorithm='sha256', shard_size=1000000)",
    "shards-blake2b": "use_shard_serialization(hashing_algorithm='blake2', shard_size=1000000)",
}
TAMPERED_AT = 2_500_000   # inside the third shard and the third read chunk of big.bin


class Audit:
    def __init__(self):
        self.events = []

    def event(self, event, /, **fields):
        self.events.append({"event": event, **fields})


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return write_key(tmp_path_factory.mktemp("key") / "k.pem")


def signed_model(directory, key, serialization: str):
    # One file several chunks long (so one range keeps a writer thread busy), a few small ones.
    files = {"big.bin": os.urandom(3 * CHUNK + 12345), "sub/small.bin": os.urandom(5000), "config.json": b"{}"}
    if serialization.startswith("files"):
        files["empty.bin"] = b""   # upstream's shards emit nothing for an empty file: files mode only
    model = make_model(directory / "m", files)
    code = ("import pathlib, sys; from model_signing import signing, hashing; m = pathlib.Path(sys.argv[1]);"
            "c = signing.Config().use_elliptic_key_signer(private_key=sys.argv[2]);"
            f"c.set_hashing_config(hashing.Config().{SERIALIZATIONS[serialization]}.set_ignored_paths(paths=[m / 'model.sig']));"
            "c.sign(m, m / 'model.sig')")
    run(sys.executable, "-c", code, model, key[0])
    return model, policy_from_toml({"sources": [str(directory)], "public_keys": [str(key[1])]}, "t")


def without_timing(events):
    return [{k: v for k, v in e.items() if k != "hash_s"} for e in events]


@pytest.mark.parametrize("serialization", SERIALIZATIONS)
def test_hash_only_and_sealing_give_the_same_digests_and_verdict(tmp_path, key, serialization):
    model, policy = signed_model(tmp_path, key, serialization)
    sealed_audit, hashed_audit = Audit(), Audit()
    with verify_model("m", str(model), policy, None, sealed_audit) as sealed, \
            verify_model("m", str(model), policy, None, hashed_audit, seal=False) as hashed:
        assert (sealed.digest, sealed.signer, sealed.version, sealed.sizes, sealed.ignored) == \
               (hashed.digest, hashed.signer, hashed.version, hashed.sizes, hashed.ignored)
        assert hashed.files == {} and set(sealed.files) == set(sealed.sizes)
        for name, fd in sealed.files.items():   # the sealed memfd holds exactly the verified bytes
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == MEMFD_SEALS
            assert os.pread(fd, sealed.sizes[name] + 1, 0) == (model / name).read_bytes()
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
    assert sealed_audit.events[0]["verdict"] == "accepted" and sealed_audit.events[0]["hash_s"] > 0
    assert without_timing(sealed_audit.events) == without_timing(hashed_audit.events)

    # Below verify_model: every range's digest, sealing or not.
    shard = 1000000 if serialization.startswith("shards") else None
    algorithm = serialization.split("-")[1]
    tree = open_tree(str(model), {"model.sig"})
    try:
        kept = hash_into_memfds(list(tree.files.values()), algorithm, shard, keep=True)
        only = hash_into_memfds(list(tree.files.values()), algorithm, shard, keep=False)
    finally:
        tree.close()
    try:
        assert {n: h.digests for n, h in kept.items()} == {n: h.digests for n, h in only.items()}
        assert len(kept["big.bin"].digests) == (4 if shard else 1)
        assert all(h.memfd == -1 for h in only.values())
    finally:
        for h in kept.values():
            os.close(h.memfd)


@pytest.mark.parametrize("serialization", SERIALIZATIONS)
def test_a_tampered_byte_is_refused_by_both_paths_alike(tmp_path, key, serialization):
    model, policy = signed_model(tmp_path, key, serialization)
    data = bytearray((model / "big.bin").read_bytes())
    data[TAMPERED_AT] ^= 0x01
    (model / "big.bin").write_bytes(bytes(data))
    algorithm = serialization.split("-")[1]
    where = f"{model}/big.bin" + (" bytes 2000000-3000000" if serialization.startswith("shards") else "")
    expected = f"{where}: digest: {algorithm} digest differs from the one in {model}/model.sig"
    fds = open_fds()
    refusals = []
    for seal in (True, False):
        audit = Audit()
        with pytest.raises(VerificationError) as info:
            verify_model("m", str(model), policy, None, audit, seal=seal)
        assert str(info.value) == expected
        assert audit.events[-1]["verdict"] == "refused" and audit.events[-1]["reason"] == expected
        refusals.append(audit.events)
        assert open_fds() == fds   # no memfd left behind: nothing to hand over
    assert refusals[0] == refusals[1]


CHILD = textwrap.dedent("""
    import os, sys
    import psutil
    from sealbox.trust._hashing import hash_into_memfds
    from sealbox.trust._storage import open_tree
    me, rss = psutil.Process(), []
    for _ in range(6):
        tree = open_tree(sys.argv[1], set())
        for h in hash_into_memfds(list(tree.files.values()), "sha256", keep=sys.argv[2] == "seal").values():
            if h.memfd >= 0:
                os.close(h.memfd)
        tree.close()
        rss.append(me.memory_info().rss)
    print(max(rss[1:]) - rss[0])
""")


@pytest.mark.parametrize("where", ["seal", "hash-only"])
def test_hashing_buffers_do_not_outlive_the_call(tmp_path, where):
    """In a process with glibc's default malloc settings (the CLI; the daemon fixes its mmap
    threshold), buffers that went through malloc stayed in per-thread arenas: +32 MiB here after
    the second call with 8 MiB buffers on 2 threads, more with more cores."""
    model = make_model(tmp_path / "m", {f"w{i}.bin": os.urandom(16 << 20) for i in range(4)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), where], capture_output=True, text=True,
                         check=True, env=env, cwd="/")
    assert int(out.stdout) < 4 << 20, f"RSS grew by {int(out.stdout) / 2**20:.1f} MiB after the first call"
