"""SFTP sources against a real sshd (Debian's openssh-server) on loopback: key authentication only,
the host key pinned from known_hosts; through the sandboxed helper."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support import RUN_ROOT
from tests.support.pki import make_model
from tests.support.sshd import Sshd, ssh_keypair

from sealbox.client import publisher as publisher_cli
from sealbox.daemon.config import policy_from_toml
from sealbox.sandbox.profile import SandboxProfile
from sealbox.transfer.fetch import fetch_model
from sealbox.transfer.sandboxed import SandboxedTransport
from sealbox.transfer.store import Store
from sealbox.trust import VerificationError


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def fetch(sshd, url, state: Path, key, known_hosts=None, client_key=None):
    pol = policy_from_toml({"sources": [url.rsplit("/", 2)[0] + "/"], "public_keys": [str(key[1])]}, "t")
    t = SandboxedTransport(url, pol.source_urls, SandboxProfile.for_fetch_helper(python=sys.executable),
                           os.path.join(RUN_ROOT, "fetch"), ssh_key=str(client_key or sshd.client_key),
                           known_hosts=str(known_hosts or sshd.known_hosts))
    try:
        return fetch_model("m", url, pol, Store(str(state)), t, None)
    finally:
        t.close()


def signed(d: Path, key) -> Path:
    make_model(d)
    assert publisher_cli.main(["sign", "key", str(d), "--private-key", str(key[0])]) == 0
    return d


def test_fetched_with_a_key_and_a_pinned_host_key_never_a_password(sshd, key, tmp_path):
    model = signed(tmp_path / "m", key)
    url = sshd.publish(model, "models/m")
    got = fetch(sshd, url, tmp_path / "s", key)
    assert sorted(got.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]
    for name in got.files:
        assert Path(got.view, name).read_bytes() == (model / name).read_bytes()
    assert got.peer.startswith(f"[127.0.0.1]:{sshd.port} (127.0.0.1:{sshd.port}) host key ssh-ed25519 SHA256:")
    log = sshd.log_text()
    assert "Accepted publickey for sealbox-sftp-test" in log
    assert "method password" not in log and "method keyboard-interactive" not in log


def test_unknown_host_key_refused_before_authenticating(sshd, key, tmp_path):
    url = sshd.publish(signed(tmp_path / "m", key), "models/mitm")
    _, other = ssh_keypair(tmp_path / "other_host_key")
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    before = sshd.log_text().count("Accepted publickey")
    with pytest.raises(VerificationError) as info:
        fetch(sshd, url, tmp_path / "s", key, known_hosts=wrong)
    assert str(info.value).startswith(f"{url}: transfer: sftp://127.0.0.1:{sshd.port}: host key ssh-ed25519 SHA256:")
    assert str(info.value).endswith(f"is not the one known_hosts pins for [127.0.0.1]:{sshd.port}")
    assert sshd.log_text().count("Accepted publickey") == before
    # known_hosts naming the host without the port (the entry for port 22) does not match either.
    wrong.write_text(f"127.0.0.1 {sshd.host_public}\n")
    with pytest.raises(VerificationError) as info:
        fetch(sshd, url, tmp_path / "s2", key, known_hosts=wrong)
    assert "is not the one known_hosts pins" in str(info.value)


def test_a_key_the_server_does_not_know_refused(sshd, key, tmp_path):
    url = sshd.publish(signed(tmp_path / "m", key), "models/badkey")
    stranger, _ = ssh_keypair(tmp_path / "stranger")
    with pytest.raises(VerificationError) as info:
        fetch(sshd, url, tmp_path / "s", key, client_key=stranger)
    assert str(info.value) == (f"{url}: transfer: sftp://sealbox-sftp-test@127.0.0.1:{sshd.port}: public key "
                               "authentication refused")
    assert "method password" not in sshd.log_text()


def test_password_in_the_url_refused(sshd, key, tmp_path):
    url = f"sftp://sealbox-sftp-test:secret@127.0.0.1:{sshd.port}/srv/m/"
    pol = policy_from_toml({"sources": ["sftp://sealbox-sftp-test@127.0.0.1/"], "public_keys": [str(key[1])]}, "t")
    with pytest.raises(VerificationError) as info:
        fetch_model("m", url, pol, Store(str(tmp_path / "s")), None, None)
    assert str(info.value) == (f"{url}: source: must be sftp://USER@HOST[:PORT]/PATH/ (key authentication only: "
                               "no password in the URL), without query or fragment")
