"""`sealbox fetch` (a signed model from an https://, oci:// or sftp:// location into a directory) and `sealbox store ls|gc`.

`fetch` is for publishers and CI: the same trust flags as `verify`; the model is fetched through the
daemon's own pipeline (sealbox.transfer: signature first, then only the signed files) into a
temporary store beside DIR, verified from there with verify_model, and DIR becomes that view.
Exit codes: 0 done, 1 refused, 2 usage or I/O error.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from urllib.parse import urlsplit

from ..transfer.fetch import Refused, check_location, fetch_model, store_policy
from ..transfer.store import Store
from ..trust import TrustPolicy, VerificationError, verify_model
from .publisher import add_trust_flags, trust_from_flags

DEFAULT_STATE_DIR = "/var/lib/sealbox"


def add_commands(sub) -> None:
    p = sub.add_parser("fetch", help="fetch a signed model from an https://, oci:// or sftp:// location, verify it, "
                       "write it to DIR",
                       description="Fetch the signature at LOCATION first and verify it with the trust flags "
                                   "(as `sealbox verify`), then exactly the files it signs, each hashed while it "
                                   "streams and refused on a digest mismatch or past its signed size; resumed "
                                   "when interrupted. Nothing unsigned is requested. http://, ftp:// and file:// "
                                   "are refused. Exit 0 fetched and verified, 1 refused, 2 usage or I/O error.")
    p.add_argument("location", metavar="LOCATION", help="https://HOST/PATH/ (a directory holding model.sig), "
                   "oci://REGISTRY/REPOSITORY:TAG (or @sha256:DIGEST) or sftp://USER@HOST[:PORT]/PATH/")
    p.add_argument("--to", required=True, metavar="DIR", help="a new directory for the verified model")
    add_trust_flags(p)
    p.add_argument("--ca-bundle", metavar="PEM", help="trust only these CAs for the server's TLS certificate "
                   "(default: the system's CAs)")
    p.add_argument("--ssh-key", metavar="KEY", help="sftp://: the private key (key authentication only)")
    p.add_argument("--known-hosts", metavar="FILE", help="sftp://: the server's pinned host key "
                   "(entries for a non-default port read [HOST]:PORT); an unknown key is refused")
    p.add_argument("--model-name", help="the model's name for its release statement (default: LOCATION's last segment)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="connect and read timeout (default 30)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary; only errors")
    p.set_defaults(func=cmd_fetch)

    store = sub.add_parser("store", help="the daemon's content-addressed store of fetched models").add_subparsers(
        dest="store_command", required=True, metavar="SUBCOMMAND")
    for name, func, text in (("ls", cmd_store_ls, "list stored blobs (sha256, size, views using it) and model views"),
                             ("gc", cmd_store_gc, "remove model views neither in use nor their model's newest, then "
                                                  "blobs no view uses, then abandoned partial downloads")):
        s = store.add_parser(name, help=text)
        s.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=f"the daemon's state_dir (default {DEFAULT_STATE_DIR})")
        s.set_defaults(func=func)


@contextlib.contextmanager
def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn
    with Progress("[progress.description]{task.description}", DownloadColumn(), TransferSpeedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("fetching", total=None)

        def advance(name: str, n: int, _size):
            bar.update(task, advance=n, description=f"fetching {name}")
        yield advance


def cmd_fetch(args) -> int:
    target = os.path.abspath(args.to)
    if os.path.lexists(target):
        print(f"sealbox fetch: {target} exists; name a new directory", file=sys.stderr)
        return 2
    try:
        keys, roots = trust_from_flags(args, "sealbox fetch")
    except (OSError, ValueError) as e:
        print(f"sealbox fetch: {e}", file=sys.stderr)
        return 2
    oci = args.location.startswith("oci://")
    location = args.location if oci or args.location.endswith("/") else args.location + "/"
    if oci:   # the repository's last component
        name = args.model_name or re.split(r"[:@]", location.rsplit("/", 1)[-1])[0] or "model"
    else:
        name = args.model_name or urlsplit(location).path.rstrip("/").rsplit("/", 1)[-1] or "model"
    # The command line names the location: it is the one allowed source.
    policy = TrustPolicy(source_urls=(location,), public_keys=keys, certificates=roots, where="command line")
    try:
        check_location(args.location, policy)  # refused before any connection
        from ..transfer.helper import client_for  # the network clients: only here, never in the daemon's imports
        work = tempfile.mkdtemp(prefix=".sealbox-fetch-", dir=os.path.dirname(target))
    except VerificationError as e:
        print(f"sealbox fetch: refused: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sealbox fetch: {e}", file=sys.stderr)
        return 2
    try:
        store = Store(work)
        def text(path):
            if path is None:
                return None
            with open(path, encoding="ascii") as f:
                return f.read(1 << 20)
        transport = client_for(location, policy.source_urls, args.ca_bundle, args.timeout, args.timeout,
                               ssh_key=text(args.ssh_key), known_hosts=text(args.known_hosts))
        try:
            with _progress(args.quiet) as progress:
                got = fetch_model(name, location, policy, store, transport, None, progress)
        finally:
            transport.close()
        with verify_model(name, got.view, store_policy(policy, store), None, None, store_links=True) as model:
            summary = (f"fetched and verified: {len(model.files)} files, {sum(model.sizes.values())} bytes "
                       f"({got.downloaded} downloaded), {model.digest}, signer {model.signer}"
                       + (f", version {model.version}" if model.version else "") + f", from {got.peer} -> {target}")
        os.rename(got.view, target)
    except VerificationError as e:
        print(f"sealbox fetch: refused: {e}", file=sys.stderr)
        return 1
    except Refused as e:   # the client could not be made (an SSH key that does not load, say)
        print(f"sealbox fetch: refused: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sealbox fetch: {e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.quiet:
        print(summary)
    return 0


def _existing_store(state_dir: str) -> Store | None:
    if not os.path.isdir(os.path.join(state_dir, "store")):
        print(f"sealbox store: no store under {state_dir}", file=sys.stderr)
        return None
    return Store(state_dir)


def cmd_store_ls(args) -> int:
    store = _existing_store(args.state_dir)
    if store is None:
        return 2
    blobs, views = store.ls()
    for b in blobs:
        print(f"sha256:{b.digest}\t{b.size}\t{b.links} view(s)")
    for model, keys in views.items():
        for key in keys:
            print(f"view\t{model}/{key}")
    return 0


def cmd_store_gc(args) -> int:
    store = _existing_store(args.state_dir)
    if store is None:
        return 2
    views, blobs = store.gc()
    for v in views:
        print(f"removed view {v}")
    for b in blobs:
        print(f"removed sha256:{b}")
    print(f"gc: {len(views)} view(s), {len(blobs)} blob(s) removed")
    return 0
