"""The publisher's side: hash a model directory and sign it, as `sealbox hash` and `sealbox sign` do.

The bundles written here are the OpenSSF model-signing format that
verify_model reads (a Sigstore bundle v0.3 over a DSSE envelope of an in-toto
statement: see _oms.py, and SECURITY.md "Signatures: the OpenSSF
model-signing format"); model_signing 1.x verifies them too. A release
statement binds a model name and version to the signed content (_rollback.py,
and SECURITY.md "Rollback protection").

    digests = model_digests(model_dir, exclude, ignore)
    statement = statement_payload(name, digests, "sha256", ignore)
    bundle = sign_payload(statement, load_private_key(path))        # model.sig
    release = sign_payload(release_payload(name, "1.2.0", subject_digest(statement, where)), key)
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

from ._hashing import file_digest
from ._oms import DEFAULT_IGNORE, is_ignored, load_private_key, parse_statement, sign_payload, statement_payload
from ._rollback import release_payload
from ._storage import open_tree, resolve_symlinks

__all__ = ["DEFAULT_IGNORE", "Progress", "load_private_key", "model_digests", "release_payload", "sign_payload",
           "statement_payload", "subject_digest"]

# Called with the total bytes to hash; the context manager it returns yields a
# callback for the bytes hashed so far, or None.
Progress = Callable[[int], AbstractContextManager[Callable[[int], None] | None]]


def model_digests(model_dir: str, exclude: set[str], ignore: tuple[str, ...], algorithm: str = "sha256",
                  progress: Progress | None = None) -> dict[str, bytes]:
    """Whole-file digests of a model, by relative POSIX name.

    `exclude` holds relative names never opened (the signature and release
    files); names under `ignore` are dropped. Symlinks are refused. Without the
    daemon's owner, mode and hard-link checks: the publisher signs its own files.
    """
    real = os.path.realpath(model_dir)
    tree = open_tree(real, exclude, strict=False)
    try:
        for n in [n for n in tree.files if is_ignored(n, ignore)]:
            tree.drop(n)
        for n in [n for n in tree.symlinks if is_ignored(n, ignore)]:
            del tree.symlinks[n]
        resolve_symlinks(tree, allow=False)
        files = list(tree.files.values())
        with (progress or _no_progress)(sum(f.size for f in files)) as advance:
            return file_digest(files, algorithm, advance)
    finally:
        tree.close()


def _no_progress(total: int) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def subject_digest(statement: bytes, where: str) -> str:
    """The hex subject digest of a model statement: what a release statement is bound to."""
    return parse_statement(statement, where).subject_digest
