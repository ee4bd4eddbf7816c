"""The HTTPS client out of the root process: the fetch helper in its own sandbox, streaming frames.

Real nginx, real bubblewrap, the real `sealbox-fetch` uid, seccomp's "fetch" allowlist and Landlock.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support import RUN_ROOT
from tests.support.https import make_ca
from tests.support.pki import make_model, run

from sealbox.client import publisher as publisher_cli
from sealbox.daemon.config import policy_from_toml
from sealbox.sandbox.profile import SandboxProfile
from sealbox.transfer.fetch import fetch_model
from sealbox.transfer.sandboxed import SandboxedTransport
from sealbox.transfer.store import Store
from sealbox.trust import VerificationError


def transport(url, pol, ca) -> SandboxedTransport:
    return SandboxedTransport(url, pol.source_urls, SandboxProfile.for_fetch_helper(python=sys.executable),
                              os.path.join(RUN_ROOT, "fetch"), ca_bundle=str(ca), read_timeout=10)


def published(nginx, key, tmp_path, under, files=None) -> str:
    make_model(tmp_path / "src", files)
    assert publisher_cli.main(["sign", "key", str(tmp_path / "src"), "--private-key", str(key[0])]) == 0
    return nginx.publish(tmp_path / "src", under)


def test_fetched_through_the_sandboxed_helper_by_host_name(nginx, key, tmp_path):
    published(nginx, key, tmp_path, "models/sandboxed")
    url = f"https://localhost:{nginx.port}/models/sandboxed/"   # a name lookup inside the sandbox
    pol = policy_from_toml({"sources": [f"https://localhost:{nginx.port}/models/"], "public_keys": [str(key[1])]}, "t")
    t = transport(url, pol, nginx.ca)
    try:
        got = fetch_model("m", url, pol, Store(str(tmp_path / "state")), t, None)
    finally:
        t.close()
    assert got.peer.startswith(f"localhost:{nginx.port} (127.0.0.1:{nginx.port})")
    assert sorted(got.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]
    for name, digest in got.files.items():
        assert Path(got.view, name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    assert t.helper is None and not os.path.exists(t.parent or "/nonexistent")


def test_helper_runs_confined_as_its_own_uid(nginx, key, tmp_path):
    url = published(nginx, key, tmp_path, "models/confined")
    pol = policy_from_toml({"sources": [nginx.url + "models/"], "public_keys": [str(key[1])]}, "t")
    t = transport(url, pol, nginx.ca)
    try:
        assert t.metadata("model.sig", 1 << 20).startswith(b"{")
        helper = [p for p in psutil.Process(t.helper.proc.pid).children(recursive=True)
                  if "sealbox.transfer.helper" in " ".join(p.cmdline())][-1]
        status = Path(f"/proc/{helper.pid}/status").read_text()
        uid = int(subprocess.run(["id", "-u", "sealbox-fetch"], capture_output=True, text=True).stdout)
        assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status and "CapEff:\t0000000000000000" in status
        # Its own network namespace is the host's (it must connect); its mount namespace is not.
        assert os.readlink(f"/proc/{helper.pid}/ns/net") == os.readlink("/proc/self/ns/net")
        assert os.readlink(f"/proc/{helper.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert t.metadata("absent.sig", 1 << 20) is None
    finally:
        t.close()


def test_other_ca_and_longer_file_refused_through_the_helper(nginx, key, tmp_path):
    model = make_model(tmp_path / "src", {"a.bin": os.urandom(5000)})
    code = ("import pathlib, sys; from model_signing import signing, hashing; m = pathlib.Path(sys.argv[1]);"
            "c = signing.Config().use_elliptic_key_signer(private_key=sys.argv[2]);"
            "c.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=1024)"
            ".set_ignored_paths(paths=[m / 'model.sig']));c.sign(m, m / 'model.sig')")
    run(sys.executable, "-c", code, model, key[0])
    url = nginx.publish(model, "models/longer")
    pol = policy_from_toml({"sources": [nginx.url + "models/"], "public_keys": [str(key[1])]}, "t")
    other = make_ca(tmp_path, "mitm")[0]
    t = transport(url, pol, other)
    with pytest.raises(VerificationError) as info:
        fetch_model("m", url, pol, Store(str(tmp_path / "s1")), t, None)
    t.close()
    assert str(info.value).startswith(f"{url}: transfer: TLS: ") and "certificate verify failed" in str(info.value)
    (nginx.docroot / "models/longer/a.bin").write_bytes((model / "a.bin").read_bytes() + os.urandom(3 << 20))
    t = transport(url, pol, nginx.ca)
    with pytest.raises(VerificationError) as info:
        fetch_model("m", url, pol, Store(str(tmp_path / "s2")), t, None)
    assert t.helper is None   # abandoned mid-file: killed
    t.close()
    assert str(info.value) == f"{url}a.bin: size: longer than the 5000 bytes signed; cut at byte 5000"
    assert os.listdir(tmp_path / "s2/store/sha256") == [] and os.listdir(tmp_path / "s2/store/tmp") == []


def test_root_side_imports_no_network_client():
    code = ("import sys, sealbox.daemon.main, sealbox.transfer.sandboxed, sealbox.transfer.fetch;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('urllib3', 'requests', 'httpx', 'paramiko', 'oras'));"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_sandbox_for_the_helper_no_fetch(nginx, key, tmp_path):
    url = published(nginx, key, tmp_path, "models/nosandbox")
    pol = policy_from_toml({"sources": [nginx.url + "models/"], "public_keys": [str(key[1])]}, "t")
    profile = SandboxProfile.for_fetch_helper(user="sealbox-no-such-user", python=sys.executable)
    t = SandboxedTransport(url, pol.source_urls, profile, os.path.join(RUN_ROOT, "fetch"), ca_bundle=str(nginx.ca))
    before = len(nginx.requests())
    with pytest.raises(VerificationError) as info:
        fetch_model("m", url, pol, Store(str(tmp_path / "s")), t, None)
    t.close()
    assert str(info.value) == (f"{url}: transfer: the fetch helper's sandbox is unavailable: uid: worker user "
                               "'sealbox-no-such-user' does not exist (create it: useradd --system "
                               "--no-create-home sealbox-no-such-user)")
    assert nginx.requests()[before:] == []
