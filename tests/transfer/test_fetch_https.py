"""Fetching signed models over HTTPS from a real nginx on loopback into the content-addressed store.

Every test feeds the real thing (a certificate from another CA, a tampered or longer file, a redirect
to http://, a killed server worker) and checks the exact refusal, that nothing was stored under a
digest name, and in nginx's access log what was (never) requested.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.https import Nginx
from tests.support.pki import make_model, run

from sealbox.client import publisher as publisher_cli
from sealbox.daemon.config import policy_from_toml
from sealbox.transfer.fetch import fetch_model, store_policy
from sealbox.transfer.https import HttpsTransport
from sealbox.transfer.store import Store
from sealbox.trust import VerificationError, verify_model

WHERE = "test: [models.m.policy]"


def signed_model(d: Path, key, files=None, version=None) -> Path:
    make_model(d, files)
    extra = ["--version", version, "--model-name", "m"] if version else []
    assert publisher_cli.main(["sign", "key", str(d), "--private-key", str(key[0]), *extra]) == 0
    return d


def policy(nginx: Nginx, key, **table):
    table.setdefault("sources", [nginx.url + "models/"])
    table.setdefault("public_keys", [str(key[1])])
    return policy_from_toml(table, WHERE)


def fetch(nginx, url, pol, state: Path, ca=None, name="m"):
    store = Store(str(state))
    transport = HttpsTransport(url if url.endswith("/") else url + "/", pol.source_urls,
                               ca_bundle=str(ca or nginx.ca), read_timeout=10)
    try:
        return fetch_model(name, url, pol, store, transport, str(state)), store
    finally:
        transport.close()


def refused(nginx, url, pol, state: Path, blobs_ok=False, **kw) -> str:
    with pytest.raises(VerificationError) as info:
        fetch(nginx, url, pol, state, **kw)
    store = Store(str(state))
    assert os.listdir(store.blobs) == [] or blobs_ok, "a refused fetch left a blob under a digest name"
    assert [n for n in os.listdir(store.tmp)] == [], "a refused fetch left a temporary file"
    assert os.listdir(store.views) == [], "a refused fetch made a view"
    return str(info.value)


def new_requests(nginx, before: int) -> list[str]:
    time.sleep(0.2)  # nginx logs a request when its response is done
    return nginx.requests()[before:]


def test_signed_model_fetched_verified_and_nothing_unsigned_requested(nginx, key, tmp_path):
    model = signed_model(tmp_path / "src", key)
    url = nginx.publish(model, "models/good")
    (nginx.docroot / "models/good/unsigned-extra.bin").write_bytes(b"never fetched")
    before = len(nginx.requests())
    got, store = fetch(nginx, url, policy(nginx, key), tmp_path / "state")
    assert got.peer.startswith(f"127.0.0.1:{nginx.port} (127.0.0.1:{nginx.port})") and got.peer.endswith(" commonName=127.0.0.1")
    assert sorted(got.files) == ["config.json", "weights/w0.bin", "weights/w1.bin"]
    assert got.downloaded == sum((model / n).stat().st_size for n in got.files)
    log = new_requests(nginx, before)
    uris = sorted(line.split()[1] for line in log)
    assert uris == ["/models/good/config.json", "/models/good/model.release.sig", "/models/good/model.sig",
                    "/models/good/weights/w0.bin", "/models/good/weights/w1.bin"]
    assert not any("unsigned-extra" in line for line in nginx.requests())
    # The store is a cache: the view is verified like any local model directory.
    with verify_model("m", got.view, store_policy(policy(nginx, key), store), str(tmp_path / "state"), None,
                      store_links=True) as verified:
        assert verified.digest == got.signed.digest
        assert sorted(verified.files) == sorted(got.files)
        for name, fd in verified.files.items():
            assert os.pread(fd, 1 << 20, 0) == (model / name).read_bytes()
    for name, digest in got.files.items():
        blob = Path(store.blob_path(digest))
        assert oct(blob.stat().st_mode & 0o777) == "0o444" and blob.stat().st_uid == os.geteuid()
        assert os.path.samefile(blob, os.path.join(got.view, name))
    # Fetched again: every file is already stored, so only the signature and release are requested.
    before = len(nginx.requests())
    again, _ = fetch(nginx, url, policy(nginx, key), tmp_path / "state")
    assert again.view == got.view and again.downloaded == 0 and sorted(again.reused) == sorted(got.files)
    assert sorted(line.split()[1] for line in new_requests(nginx, before)) == [
        "/models/good/model.release.sig", "/models/good/model.sig"]


def test_server_certificate_from_another_ca_refused(nginx, key, tmp_path):
    from tests.support.https import make_ca
    other_ca = make_ca(tmp_path, "mitm-ca")[0]
    url = nginx.publish(signed_model(tmp_path / "src", key), "models/mitm")
    before = len(nginx.requests())
    msg = refused(nginx, url, policy(nginx, key), tmp_path / "state", ca=other_ca)
    assert msg.startswith(f"{url}: transfer: TLS: ") and "certificate verify failed" in msg
    assert new_requests(nginx, before) == []  # no request was sent over the unverified connection


def test_tampered_file_refused_nothing_stored(nginx, key, tmp_path):
    model = signed_model(tmp_path / "src", key)
    url = nginx.publish(model, "models/tampered")
    data = bytearray((model / "weights/w1.bin").read_bytes())
    data[100] ^= 1
    (nginx.docroot / "models/tampered/weights/w1.bin").write_bytes(bytes(data))
    state = tmp_path / "state"
    with pytest.raises(VerificationError) as info:
        fetch(nginx, url, policy(nginx, key), state)
    assert str(info.value) == f"{url}weights/w1.bin: digest: sha256 digest differs from the signed one; not stored"
    store = Store(str(state))
    import hashlib
    assert hashlib.sha256(bytes(data)).hexdigest() not in os.listdir(store.blobs)
    assert os.listdir(store.tmp) == [] and os.listdir(store.views) == []


def _sign_shards(model: Path, key, shard_size: int) -> None:
    code = ("import pathlib, sys; from model_signing import signing, hashing; m = pathlib.Path(sys.argv[1]);"
            "c = signing.Config().use_elliptic_key_signer(private_key=sys.argv[2]);"
            f"c.set_hashing_config(hashing.Config().use_shard_serialization(shard_size={shard_size})"
            ".set_ignored_paths(paths=[m / 'model.sig']));"
            "c.sign(m, m / 'model.sig')")
    run(sys.executable, "-c", code, model, key[0])


def test_shards_tampered_refused_at_its_shard_and_longer_file_cut(nginx, key, tmp_path):
    model = make_model(tmp_path / "src", {"a.bin": os.urandom(5000), "b.bin": os.urandom(3000)})
    _sign_shards(model, key, 1024)
    url = nginx.publish(model, "models/shards")
    got, _ = fetch(nginx, url, policy(nginx, key), tmp_path / "ok")
    assert sorted(got.files) == ["a.bin", "b.bin"]
    # One wrong byte in the second shard: refused at the end of that shard.
    bad = bytearray((model / "a.bin").read_bytes())
    bad[1500] ^= 1
    (nginx.docroot / "models/shards/a.bin").write_bytes(bytes(bad))
    msg = refused(nginx, url, policy(nginx, key), tmp_path / "tampered")
    assert msg == f"{url}a.bin bytes 1024-2048: digest: sha256 digest differs from the signed one; refused at the end of this shard, not stored"
    # Longer than signed: cut at the first byte past the signed size.
    (nginx.docroot / "models/shards/a.bin").write_bytes((model / "a.bin").read_bytes() + b"X" * 10_000)
    msg = refused(nginx, url, policy(nginx, key), tmp_path / "longer")
    assert msg == f"{url}a.bin: size: longer than the 5000 bytes signed; cut at byte 5000"


def test_files_signature_bounded_by_max_bytes(nginx, key, tmp_path):
    model = signed_model(tmp_path / "src", key)
    url = nginx.publish(model, "models/big")
    (nginx.docroot / "models/big/weights/w1.bin").write_bytes(os.urandom(200_000))
    msg = refused(nginx, url, policy(nginx, key, max_bytes=10_000), tmp_path / "state", blobs_ok=True)
    assert msg == f"{url}weights/w1.bin: size: more than the policy's max_bytes 10000 for the whole model; cut there"


def test_redirect_to_http_refused_and_to_trusted_https_followed(nginx, key, tmp_path):
    url = nginx.publish(signed_model(tmp_path / "src", key), "models/redir")
    pol = policy(nginx, key, sources=[nginx.url + "models/", nginx.url + "to-http/", nginx.url + "moved/"])
    msg = refused(nginx, nginx.url + "to-http/redir/", pol, tmp_path / "http")
    assert msg == (f"{nginx.url}to-http/redir/: transfer: {nginx.url}to-http/redir/model.sig redirects to "
                   f"http://127.0.0.1:{nginx.port}/models/redir/model.sig, which is not an https:// location "
                   "under the policy's sources; not followed")
    got, _ = fetch(nginx, nginx.url + "moved/redir/", pol, tmp_path / "https")
    assert len(got.files) == 3
    # The same https redirect to a prefix the policy does not trust is not followed.
    only_moved = policy(nginx, key, sources=[nginx.url + "moved/"])
    msg = refused(nginx, nginx.url + "moved/redir/", only_moved, tmp_path / "untrusted")
    assert "which is not an https:// location under the policy's sources; not followed" in msg
    assert url  # published under models/redir


@pytest.mark.parametrize("location, why", [
    ("http://127.0.0.1:1/models/m/", "http:// is not a secure transfer; only https://, oci:// and sftp:// locations are fetched (http, ftp and file are refused)"),
    ("ftp://127.0.0.1:1/models/m/", "ftp:// is not a secure transfer; only https://, oci:// and sftp:// locations are fetched (http, ftp and file are refused)"),
    ("file:///etc/", "file:// is not a secure transfer; only https://, oci:// and sftp:// locations are fetched (http, ftp and file are refused)"),
])
def test_insecure_schemes_refused(nginx, key, tmp_path, location, why):
    before = len(nginx.requests())
    msg = refused(nginx, location, policy(nginx, key), tmp_path / "state")
    assert msg == f"{location}: source: {why}"
    assert new_requests(nginx, before) == []


def test_source_outside_policy_refused_before_connecting(nginx, key, tmp_path):
    nginx.publish(signed_model(tmp_path / "src", key), "elsewhere/m")
    before = len(nginx.requests())
    msg = refused(nginx, nginx.url + "elsewhere/m/", policy(nginx, key), tmp_path / "state")
    assert msg == f"{nginx.url}elsewhere/m/: source: not under an allowed source URL ({nginx.url}models/)"
    assert new_requests(nginx, before) == []


def test_interrupted_download_resumed_with_range(nginx, key, tmp_path):
    model = signed_model(tmp_path / "src", key, {"big.bin": os.urandom(6 << 20), "small.txt": b"hi\n"})
    url = nginx.publish(model, "slow/m")
    pol = policy(nginx, key, sources=[nginx.url + "slow/"])
    state = tmp_path / "state"
    Store(str(state))
    killed = threading.Event()

    def kill_midway():
        tmp = Path(state) / "store" / "tmp"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sizes = [p.stat().st_size for p in tmp.iterdir() if p.is_file()] if tmp.exists() else []
            if any(s > (2 << 20) for s in sizes):
                nginx.kill_worker()
                killed.set()
                return
            time.sleep(0.02)

    before = len(nginx.requests())
    killer = threading.Thread(target=kill_midway)
    killer.start()
    got, store = fetch(nginx, url, pol, state)
    killer.join()
    assert killed.is_set()
    assert Path(store.blob_path(got.files["big.bin"])).read_bytes() == (model / "big.bin").read_bytes()
    big = [line for line in new_requests(nginx, before) if "/big.bin" in line]
    # The killed worker logs nothing for its request; the resumed one asks for the rest only.
    assert big and all(" 206 range=bytes=" in line for line in big), big
    start = int(big[-1].split("range=bytes=")[1].split("-")[0])
    assert start > (2 << 20)
    assert got.downloaded == (6 << 20) + 3


def test_rollback_refused_before_downloading(nginx, key, tmp_path):
    state = tmp_path / "state"
    new = nginx.publish(signed_model(tmp_path / "v2", key, version="2.0"), "models/v2")
    got, _ = fetch(nginx, new, policy(nginx, key), state)
    from sealbox.trust import record_version
    record_version(str(state), "m", got.signed.version)
    old = nginx.publish(signed_model(tmp_path / "v1", key, version="1.0"), "models/v1")
    before = len(nginx.requests())
    with pytest.raises(VerificationError) as info:
        fetch(nginx, old, policy(nginx, key), state)
    assert info.value.check == "rollback"
    assert sorted(line.split()[1] for line in new_requests(nginx, before)) == [
        "/models/v1/model.release.sig", "/models/v1/model.sig"]
    shutil.rmtree(tmp_path / "v1")


def test_source_prefix_bounded_by_port_and_whole_path_segments(nginx, key, tmp_path):
    """`startswith` let https://HOST cover any port of HOST and .../mod cover .../models-evil/: neither is
    fetched now, and nothing is requested."""
    nginx.publish(signed_model(tmp_path / "src", key), "models-evil/m")
    before = len(nginx.requests())
    sibling = policy(nginx, key, sources=[nginx.url + "models"])
    msg = refused(nginx, nginx.url + "models-evil/m/", sibling, tmp_path / "sibling")
    assert msg == f"{nginx.url}models-evil/m/: source: not under an allowed source URL ({nginx.url}models)"
    any_port = policy(nginx, key, sources=["https://127.0.0.1"])
    msg = refused(nginx, nginx.url + "models-evil/m/", any_port, tmp_path / "port")
    assert msg == f"{nginx.url}models-evil/m/: source: not under an allowed source URL (https://127.0.0.1)"
    assert new_requests(nginx, before) == []


def test_redirect_bounded_by_whole_path_segments(nginx, key, tmp_path):
    """/moved/X redirects to /models/X: a source prefix .../mod must not cover it."""
    nginx.publish(signed_model(tmp_path / "src", key), "models/seg")
    pol = policy(nginx, key, sources=[nginx.url + "moved/", nginx.url + "mod"])
    before = len(nginx.requests())
    msg = refused(nginx, nginx.url + "moved/seg/", pol, tmp_path / "state")
    assert msg == (f"{nginx.url}moved/seg/: transfer: {nginx.url}moved/seg/model.sig redirects to "
                   f"{nginx.url}models/seg/model.sig, which is not an https:// location under the policy's "
                   "sources; not followed")
    assert [line.split()[1] for line in new_requests(nginx, before)] == ["/moved/seg/model.sig"]


def test_encoded_dot_segments_refused_in_locations_and_redirects(nginx, key, tmp_path):
    """nginx decodes /models/%2e%2e/private/m/ into /private/m/: refused before any request, and as a
    redirect target (nothing under /private/ is ever requested)."""
    nginx.publish(signed_model(tmp_path / "src", key), "private/m")
    pol = policy(nginx, key, sources=[nginx.url + "models/", nginx.url + "dots/", nginx.url + "dotdot/"])
    before = len(nginx.requests())
    for location in (nginx.url + "models/%2e%2e/private/m/", nginx.url + "models/.%2E/private/m/",
                     nginx.url + "models/..%2fprivate/m/"):
        msg = refused(nginx, location, pol, tmp_path / "location")
        assert msg == (f"{location}: source: a percent-encoded '.', '/', '\\' or NUL, or a backslash, in the "
                       "path is refused (servers decode them)")
    assert new_requests(nginx, before) == []
    msg = refused(nginx, nginx.url + "dots/m/", pol, tmp_path / "dots")
    assert msg == (f"{nginx.url}dots/m/: transfer: {nginx.url}dots/m/model.sig redirects to "
                   f"{nginx.url}models/%2e%2e/private/m/model.sig: a percent-encoded '.', '/', '\\' or NUL, or a "
                   "backslash, in the path is refused (servers decode them); not followed")
    msg = refused(nginx, nginx.url + "dotdot/m/", pol, tmp_path / "dotdot")
    assert msg == (f"{nginx.url}dotdot/m/: transfer: {nginx.url}dotdot/m/model.sig redirects to "
                   f"{nginx.url}models/../private/m/model.sig: a '..' path segment is refused; not followed")
    uris = [line.split()[1] for line in new_requests(nginx, before)]
    assert uris == ["/dots/m/model.sig", "/dotdot/m/model.sig"]
    assert not any("/private/" in line for line in nginx.requests())


def test_policy_pins_drive_the_download(nginx, key, tmp_path):
    """require_signature = false: the pinned digests name what is fetched (no signature is requested,
    nor any unpinned file on the server), from inline pins and from a pin manifest alike; a wrong pin
    is refused with nothing stored."""
    import hashlib
    model = make_model(tmp_path / "src")
    url = nginx.publish(model, "models/pinned")
    (nginx.docroot / "models/pinned/unpinned.bin").write_bytes(b"never fetched")
    names = ["config.json", "weights/w0.bin", "weights/w1.bin"]
    pins = {n: "sha256:" + hashlib.sha256((model / n).read_bytes()).hexdigest() for n in names}
    inline = policy(nginx, key, require_signature=False, pinned_files=pins)
    manifest = tmp_path / "pins.sha256"
    manifest.write_text("".join(f"{d.split(':')[1]}  {n}\n" for n, d in pins.items()))
    from_file = policy(nginx, key, require_signature=False, pinned_manifest=str(manifest))
    for i, pol in enumerate((inline, from_file)):
        before = len(nginx.requests())
        got, store = fetch(nginx, url, pol, tmp_path / f"state{i}")
        assert sorted(got.files) == names and got.downloaded == sum((model / n).stat().st_size for n in names)
        assert sorted(line.split()[1] for line in new_requests(nginx, before)) == [f"/models/pinned/{n}" for n in names]
        with verify_model("m", got.view, store_policy(pol, store), str(tmp_path / f"state{i}"), None,
                          store_links=True) as verified:
            assert sorted(verified.files) == names
    assert not any("/models/pinned/unpinned" in line or "/models/pinned/model." in line for line in nginx.requests())
    # A wrong pin on the first file fetched: refused at its end, nothing stored, nothing after it requested.
    wrong = dict(pins, **{"config.json": "sha256:" + "0" * 64})
    before = len(nginx.requests())
    msg = refused(nginx, url, policy(nginx, key, require_signature=False, pinned_files=wrong), tmp_path / "wrong")
    assert msg == f"{url}config.json: digest: sha256 digest differs from the pinned one; not stored"
    assert [line.split()[1] for line in new_requests(nginx, before)] == ["/models/pinned/config.json"]


def test_policy_max_files_refuses_before_any_file_is_requested(nginx, key, tmp_path):
    url = nginx.publish(signed_model(tmp_path / "src", key), "models/many")
    before = len(nginx.requests())
    msg = refused(nginx, url, policy(nginx, key, max_files=2), tmp_path / "state")
    assert msg == f"{url}model.sig: size: names 3 files, more than the policy's max_files 2; none requested"
    assert sorted(line.split()[1] for line in new_requests(nginx, before)) == [
        "/models/many/model.release.sig", "/models/many/model.sig"]
    got, _ = fetch(nginx, url, policy(nginx, key, max_files=3), tmp_path / "ok")
    assert len(got.files) == 3
