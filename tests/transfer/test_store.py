"""The content-addressed store: stored once, gc keeps what is in use, a killed writer leaves no blob;
and `sealbox fetch` / `sealbox store` as a user runs them (real nginx, real processes)."""
from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from tests.support.pki import make_model

from sealbox.client import publisher as publisher_cli
from sealbox.daemon.config import policy_from_toml
from sealbox.transfer.fetch import fetch_model
from sealbox.transfer.https import HttpsTransport
from sealbox.transfer.store import Store

CLI = [sys.executable, "-c", "import sys; from sealbox.client.cli import main; sys.exit(main())"]


def publish(nginx, key, d: Path, under: str, files) -> str:
    make_model(d, files)
    assert publisher_cli.main(["sign", "key", str(d), "--private-key", str(key[0])]) == 0
    return nginx.publish(d, under)


def fetch(nginx, key, url, store: Store, name: str):
    pol = policy_from_toml({"sources": [nginx.url], "public_keys": [str(key[1])]}, "test")
    t = HttpsTransport(url, pol.source_urls, ca_bundle=str(nginx.ca))
    try:
        return fetch_model(name, url, pol, store, t, None)
    finally:
        t.close()


def test_shared_file_stored_once_and_gc_keeps_what_is_in_use(nginx, key, tmp_path):
    shared = os.urandom(4000)
    a = publish(nginx, key, tmp_path / "a", "store/a", {"shared.bin": shared, "a.bin": b"only a"})
    b = publish(nginx, key, tmp_path / "b", "store/b", {"shared.bin": shared, "b.bin": b"only b"})
    store = Store(str(tmp_path / "state"))
    got_a, got_b = fetch(nginx, key, a, store, "a"), fetch(nginx, key, b, store, "b")
    shared_hex = hashlib.sha256(shared).hexdigest()
    assert got_a.files["shared.bin"] == got_b.files["shared.bin"] == shared_hex
    blobs = {x.digest: x for x in store.ls()[0]}
    assert len(blobs) == 3 and blobs[shared_hex].links == 2   # one blob, linked by both views
    assert got_b.reused == ["shared.bin"]                      # never requested for b

    # A second version of a; the first is in use by a (running) daemon: gc keeps it.
    a2 = publish(nginx, key, tmp_path / "a2", "store/a2", {"shared.bin": shared, "a.bin": b"a, version 2"})
    time.sleep(0.01)
    got_a2 = fetch(nginx, key, a2, store, "a")
    hold = store.hold("a", got_a.view)
    assert store.gc() == ([], [])
    assert os.path.isdir(got_a.view)
    os.close(hold)
    # Released: the old view goes, and the blob only it used; the shared blob and the newest views stay.
    views, blobs_removed = store.gc()
    assert views == [f"a/{os.path.basename(got_a.view)}"]
    assert blobs_removed == [hashlib.sha256(b"only a").hexdigest()]
    assert os.path.isdir(got_a2.view) and os.path.isdir(got_b.view)
    assert {x.digest for x in store.ls()[0]} == {shared_hex, hashlib.sha256(b"a, version 2").hexdigest(),
                                                 hashlib.sha256(b"only b").hexdigest()}
    r = subprocess.run([*CLI, "store", "ls", "--state-dir", str(tmp_path / "state")], capture_output=True, text=True)
    assert r.returncode == 0 and f"sha256:{shared_hex}\t4000\t2 view(s)" in r.stdout.splitlines()


def test_killed_fetch_leaves_no_blob_under_a_digest_name(nginx, key, tmp_path):
    big = os.urandom(8 << 20)
    url = publish(nginx, key, tmp_path / "src", "slow/killed", {"big.bin": big})
    target = tmp_path / "out" / "m"
    target.parent.mkdir()
    proc = subprocess.Popen([*CLI, "fetch", url, "--to", str(target), "--public-key", str(key[1]),
                             "--ca-bundle", str(nginx.ca), "--quiet"], stderr=subprocess.PIPE)
    deadline, partial = time.monotonic() + 60, []
    while time.monotonic() < deadline and not partial:
        partial = [p for p in glob.glob(str(target.parent / ".sealbox-fetch-*/store/tmp/*")) if os.path.getsize(p) > 0]
        time.sleep(0.01)
    assert partial, "the fetch never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = glob.glob(str(target.parent / ".sealbox-fetch-*"))[0]
    store = Store(state)
    assert os.listdir(store.blobs) == []                      # nothing under a digest name
    assert 0 < os.path.getsize(partial[0]) < len(big)           # only the partial temporary file
    assert not target.exists()
    assert store.gc() == ([], []) and os.listdir(store.tmp) == []  # its writer is dead: gc removes it


def test_cli_fetch_writes_the_verified_model(nginx, key, tmp_path):
    files = {"config.json": b"{}\n", "w/weights.bin": os.urandom(10000)}
    url = publish(nginx, key, tmp_path / "src", "store/cli", files)
    target = tmp_path / "out"
    r = subprocess.run([*CLI, "fetch", url, "--to", str(target), "--public-key", str(key[1]),
                        "--ca-bundle", str(nginx.ca)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("fetched and verified: 2 files, 10003 bytes (10003 downloaded), sha256:")
    assert r.stdout.rstrip().endswith(f"-> {target}")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "config.json", "model.sig", "w/weights.bin"]
    assert (target / "w/weights.bin").read_bytes() == files["w/weights.bin"]
    assert (target / "w/weights.bin").stat().st_nlink == 1
    assert glob.glob(str(tmp_path / ".sealbox-fetch-*")) == []   # the temporary store is gone
    # Quiet: nothing on stdout. http:// refused with its reason, exit 1, nothing written.
    r = subprocess.run([*CLI, "fetch", url, "--to", str(tmp_path / "q"), "--public-key", str(key[1]),
                        "--ca-bundle", str(nginx.ca), "-q"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "")
    insecure = url.replace("https://", "http://")
    r = subprocess.run([*CLI, "fetch", insecure, "--to", str(tmp_path / "h"), "--public-key", str(key[1])],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == (f"sealbox fetch: refused: {insecure}: source: http:// is not a secure "
                                              "transfer; only https://, oci:// and sftp:// locations are fetched "
                                              "(http, ftp and file are refused)\n")
    assert not (tmp_path / "h").exists()
    # A certificate from another CA (the system CAs do not know the test CA): refused, nothing written.
    r = subprocess.run([*CLI, "fetch", url, "--to", str(tmp_path / "m"), "--public-key", str(key[1])],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "transfer: TLS: " in r.stderr and "certificate verify failed" in r.stderr
    assert not (tmp_path / "m").exists()


def _on_a_terminal(args) -> tuple[int, str]:
    """Runs args with stdin, stdout and stderr on a pseudo-terminal; returns (exit code, all it wrote)."""
    import pty
    import select
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave,
                            env=dict(os.environ, TERM="xterm-256color", COLUMNS="120"))
    os.close(slave)
    out = b""
    try:
        while select.select([master], [], [], 60)[0]:
            try:
                data = os.read(master, 1 << 16)
            except OSError:   # EIO: every writer has closed the terminal
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
        proc.wait(30)
    return proc.returncode, out.decode("utf-8", "replace")


def test_cli_fetch_progress_bar_on_a_terminal_and_nothing_with_q(nginx, key, tmp_path):
    # 4 MiB behind /slow/ (2 MiB/s after the first MiB): the bar is drawn for more than a second.
    url = publish(nginx, key, tmp_path / "src", "slow/bar", {"config.json": b"{}\n", "big.bin": os.urandom(4 << 20)})
    flags = ["--public-key", str(key[1]), "--ca-bundle", str(nginx.ca)]
    code, out = _on_a_terminal([*CLI, "fetch", url, "--to", str(tmp_path / "bar"), *flags])
    assert code == 0, out
    assert "\x1b[" in out and "fetching big.bin" in out, out    # a live bar, redrawn with escape sequences
    assert "MB/s" in out or "kB/s" in out, out                   # the transfer speed column
    assert "fetched and verified: 2 files, 4194307 bytes (4194307 downloaded)" in out
    code, out = _on_a_terminal([*CLI, "fetch", url, "--to", str(tmp_path / "quiet"), *flags, "-q"])
    assert (code, out) == (0, "")
    assert (tmp_path / "quiet/big.bin").read_bytes() == (tmp_path / "src/big.bin").read_bytes()
