"""The publisher's commands: hash, sign (key or certificate), verify.

Mounted under the `sealbox` CLI by add_commands(); main(argv) runs them
alone. `hash` and `sign` use sealbox.trust.signing; `verify` runs exactly
the daemon's verify_model (sealbox.trust) with a policy built from the flags
(hashing only: it hands no sealed copies over);
`keygen` makes a signing key the trust policy accepts.
Exit codes: 0 verified/done, 1 refused, 2 usage or I/O error.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..trust import TrustPolicy, VerificationError, signing, verify_model
from ..trust.policy import ANY_IDENTITY, TrustedKey, TrustedRoots, key_fingerprint, normalize_identity
from ..trust.verifying import inside

DEFAULT_SIGNATURE = "model.sig"
DEFAULT_RELEASE = "model.release.sig"


CURVES = {"p256": ec.SECP256R1, "p384": ec.SECP384R1, "p521": ec.SECP521R1}


def add_commands(subparsers) -> None:
    k = subparsers.add_parser("keygen", help="make an EC signing key pair (KEY.pem private, KEY.pub public)",
                              description="Write a new EC private key (PKCS#8 PEM, mode 0600, never overwritten) "
                                          "and its public key beside it (.pub, what [policy] public_keys and "
                                          "`sealbox verify --public-key` take), and print the signer identity "
                                          "the key yields (key:sha256:<fingerprint>: what `sealbox verify` and "
                                          "each answer's sealbox_signer parameter show). The same with openssl: "
                                          "openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 "
                                          "-topk8 -nocrypt -out KEY.pem && openssl ec -in KEY.pem -pubout -out KEY.pub")
    k.add_argument("private_key", metavar="KEY.pem")
    k.add_argument("--public-key", metavar="KEY.pub", help="where to write the public key (default: KEY.pub)")
    k.add_argument("--curve", choices=sorted(CURVES), default="p256")
    k.set_defaults(func=cmd_keygen)

    p = subparsers.add_parser("hash", help="print the SHA-256 of every model file (a pin manifest for unsigned models)")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.set_defaults(func=cmd_hash)

    sign = subparsers.add_parser("sign", help="sign a model in the OpenSSF model-signing format")
    methods = sign.add_subparsers(dest="method", required=True)
    for method in ("key", "certificate"):
        s = methods.add_parser(method, help=f"sign with an EC private key{' and its certificate' if method == 'certificate' else ''}")
        s.add_argument("model_dir", metavar="MODEL_DIR")
        s.add_argument("--private-key", required=True, metavar="KEY.pem")
        if method == "certificate":
            s.add_argument("--signing-certificate", required=True, metavar="CERT.pem")
            s.add_argument("--certificate-chain", action="append", default=[], metavar="CHAIN.pem",
                           help="intermediate certificates to embed (repeatable)")
        s.add_argument("--signature", metavar="OUT", help="where to write the bundle (default MODEL_DIR/model.sig)")
        s.add_argument("--hash", choices=("sha256", "blake3"), default="sha256",
                       help="file digest: blake3 verifies several times faster; model_signing 1.1's API verifies it, its CLI only sha256")
        s.add_argument("--version", help="also write a signed release statement (model.release.sig beside the signature)")
        s.add_argument("--model-name", metavar="NAME",
                       help="the model's name in the signed statement (default: the directory's name) and in the "
                            "release statement (needed with --version); the daemon's policy key model_name can require it")
        s.set_defaults(func=cmd_sign)

    v = subparsers.add_parser("verify", help="verify a model exactly as the daemon does",
                              description="Run the daemon's verification (storage checks, signature, file set, "
                                          "release statement, digests) on MODEL_DIR with a trust policy made from "
                                          "these flags. It hashes the files without copying them into sealed "
                                          "memory, which only the daemon needs (it hands those copies to a worker): "
                                          "the same digests and verdict. Exit status: 0 verified, 1 refused, 2 "
                                          "usage or I/O error.")
    v.add_argument("model_dir", metavar="MODEL_DIR")
    v.add_argument("--signature", metavar="SIG", help=f"the signature bundle (default MODEL_DIR/{DEFAULT_SIGNATURE}); "
                   f"a release statement is read from {DEFAULT_RELEASE} beside it")
    add_trust_flags(v)
    v.add_argument("--ignore-paths", action="append", default=[], metavar="NAME",
                   help="files or directories the signature does not cover, to skip (as upstream's verify "
                        "--ignore-paths; they would never reach a worker; repeatable)")
    v.add_argument("--model-name", help="expected model name in the release statement (default: the directory name)")
    v.set_defaults(func=cmd_verify)


def add_trust_flags(p) -> None:
    """Who may have signed the model: the flags of `verify`, shared with `sealbox fetch`."""
    trust = p.add_mutually_exclusive_group(required=True)
    trust.add_argument("--public-key", action="append", metavar="KEY.pub")
    trust.add_argument("--certificate-chain", action="append", metavar="ROOT.pem",
                       help="trust anchors (repeatable)")
    p.add_argument("--identity", action="append", default=[],
                   help="pinned signer identity: email:ADDR (or a bare ADDR), uri:URI or subject:NAME (repeatable)")


def trust_from_flags(args, prog: str) -> tuple[tuple[TrustedKey, ...], tuple[TrustedRoots, ...]]:
    """The keys or roots the flags name (OSError/ValueError for unreadable ones); warns on unpinned roots."""
    keys = tuple(TrustedKey.load(p) for p in args.public_key or ())
    identities = tuple(normalize_identity(i) for i in args.identity) or (ANY_IDENTITY,)
    roots = tuple(TrustedRoots.load(p, identities) for p in args.certificate_chain or ())
    if roots and not args.identity:
        print(f"{prog}: warning: no --identity given, any signer chaining to the roots is accepted", file=sys.stderr)
    return keys, roots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sealbox")
    add_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@contextlib.contextmanager
def _progress(total: int, what: str):
    """A progress bar on an interactive stderr for long hashing, else nothing."""
    if not sys.stderr.isatty() or total < (256 << 20):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _model_digests(model_dir: str, exclude: set[str], ignore: tuple[str, ...], algorithm: str = "sha256") -> dict[str, bytes]:
    return signing.model_digests(model_dir, exclude, ignore, algorithm, lambda total: _progress(total, "hashing"))


def _excluded(model_dir: str, *paths: str) -> set[str]:
    """The names of those metadata files that lie inside the model directory."""
    real = os.path.realpath(model_dir)
    return {rel for rel in (inside(os.path.realpath(p), real) for p in paths) if rel}


def cmd_hash(args) -> int:
    real = os.path.realpath(args.model_dir)
    try:
        digests = _model_digests(real, _excluded(real, os.path.join(real, DEFAULT_SIGNATURE),
                                                 os.path.join(real, DEFAULT_RELEASE)), ())
    except VerificationError as e:
        print(f"sealbox hash: refused: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sealbox hash: {e}", file=sys.stderr)
        return 2
    names = sorted(digests, key=lambda n: n.split("/"))
    for n in names:
        print(f"{digests[n].hex()}  {n}")
    print(f"# sealbox-digest sha256:{hashlib.sha256(b''.join(digests[n] for n in names)).hexdigest()}")
    return 0


def cmd_sign(args) -> int:
    if args.version is not None and args.model_name is None:
        print("sealbox sign: --version and --model-name go together", file=sys.stderr)
        return 2
    real = os.path.realpath(args.model_dir)
    if not os.path.isdir(real):
        print(f"sealbox sign: {args.model_dir}: not a directory", file=sys.stderr)
        return 2
    sig_path = args.signature or os.path.join(real, DEFAULT_SIGNATURE)
    release_path = os.path.join(os.path.dirname(os.path.abspath(sig_path)), DEFAULT_RELEASE)
    exclude = _excluded(real, sig_path, release_path)
    try:
        key = signing.load_private_key(args.private_key)
        chain = None
        if args.method == "certificate":
            from cryptography import x509  # only here: the key commands start without it
            with open(args.signing_certificate, "rb") as f:
                chain = [x509.load_pem_x509_certificate(f.read())]
            for path in args.certificate_chain:
                with open(path, "rb") as f:
                    chain += x509.load_pem_x509_certificates(f.read())
        ignore = sorted(set(signing.DEFAULT_IGNORE) | exclude)
        digests = _model_digests(real, exclude, tuple(ignore), args.hash)
        payload = signing.statement_payload(args.model_name or os.path.basename(real), digests, args.hash, ignore)
        _write(sig_path, signing.sign_payload(payload, key, chain))
        if args.version is not None:
            subject = signing.subject_digest(payload, sig_path)
            release = signing.release_payload(args.model_name, args.version, subject)
            _write(release_path, signing.sign_payload(release, key, chain))
    except VerificationError as e:
        print(f"sealbox sign: refused: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"sealbox sign: {e}", file=sys.stderr)
        return 2
    print(f"signed {len(digests)} files: {sig_path}" + (f" and {release_path} (version {args.version})" if args.version else ""))
    return 0


def _write(path: str, data: bytes) -> None:
    # 0644: a signature is public; the daemon refuses group/world-writable files.
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _as_model_names(real: str, paths: list[str]) -> list[str]:
    """Like model_signing, accept paths as given on the command line (relative
    to the current directory) as well as names inside the model."""
    out = []
    for p in paths:
        rel = inside(os.path.realpath(p), real)
        out.append(rel if rel and os.path.lexists(p) else p)
    return out


def cmd_keygen(args) -> int:
    private = args.private_key
    public = args.public_key or (os.path.splitext(private)[0] + ".pub")
    key = ec.generate_private_key(CURVES[args.curve]())
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        _write(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    except OSError as e:
        print(f"sealbox keygen: {e.filename or private}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {private} (private, keep it secret) and {public}\nsigner key:sha256:{key_fingerprint(key.public_key())}")
    return 0


RELEASE_FOR_OTHER_MODEL = re.compile(r"is for model '(.*)', not '(.*)'")


def cmd_verify(args) -> int:
    real = os.path.realpath(args.model_dir)
    sig = os.path.abspath(args.signature or os.path.join(real, DEFAULT_SIGNATURE))
    try:
        keys, roots = trust_from_flags(args, "sealbox verify")
    except (OSError, ValueError) as e:
        print(f"sealbox verify: {e}", file=sys.stderr)
        return 2
    # The source is the model directory itself (a single-file model: its directory): the command line
    # names the model, so nothing above it is walked or checked.
    source = real if os.path.isdir(real) else os.path.dirname(real)
    policy = TrustPolicy(sources=(source,), public_keys=keys, certificates=roots, signature=sig,
                         release=os.path.join(os.path.dirname(sig), DEFAULT_RELEASE),
                         ignore_paths=tuple(_as_model_names(real, args.ignore_paths)), where="command line")
    name = args.model_name or os.path.basename(real)
    try:
        # seal=False: the CLI hands nothing over, so it hashes without copying into sealed memfds
        # (the same reads, digests and checks as the daemon's).
        with verify_model(name, real, policy, None, None, seal=False) as model:
            print(f"verified: {len(model.sizes)} files, {model.digest}, signer {model.signer}"
                  + (f", version {model.version}" if model.version else "")
                  + (f"; ignored (not verified): {', '.join(model.ignored)}" if model.ignored else ""))
    except VerificationError as e:
        print(f"sealbox verify: refused: {e}", file=sys.stderr)
        other = RELEASE_FOR_OTHER_MODEL.fullmatch(e.detail) if e.check == "release" else None
        if other and not args.model_name:
            print(f"sealbox verify: hint: the model name defaults to the directory's name '{name}'; if the daemon "
                  f"serves it as '{other.group(1)}', say --model-name '{other.group(1)}'", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sealbox verify: {e}", file=sys.stderr)
        return 2
    return 0
