"""Rollback protection: signed release statements and the highest version seen.

A release statement is a second DSSE envelope in a Sigstore bundle (by
default `model.release.sig` beside `model.sig`), signed by the same signer as
the OMS bundle. Its in-toto statement binds a model name and version to the
OMS statement's subject digest, so it cannot be moved to other content:

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "<model>", "digest": {"sha256": "<OMS subject digest>"}}],
     "predicateType": "https://sealbox.dev/release/v1",
     "predicate": {"model": "<model>", "version": "1.2.0"}}

The daemon keeps the highest version accepted per model in
<state_dir>/versions.json (root-only, replaced atomically): "model": "1.2.0"
for a signed release, "model": {"version": "1.2.0", "digest": "sha256:..."}
for a version the operator states in the config (policy key `version`, for
models signed without a release statement, such as upstream-signed ones):
then the digest is kept with it, and other content under the same or a lower
stated version is refused.
"""
from __future__ import annotations

import json
import os
import stat

from ._oms import MAX_JSON_BYTES, STATEMENT_TYPE, strict_json
from .errors import VerificationError
from .policy import TrustPolicy, parse_version

RELEASE_PREDICATE = "https://sealbox.dev/release/v1"
STATE_FILE = "versions.json"


def release_payload(model: str, version: str, subject_digest: str) -> bytes:
    parse_version(version)  # refuse to sign what the daemon would refuse to read
    return json.dumps({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model, "digest": {"sha256": subject_digest}}],
        "predicateType": RELEASE_PREDICATE,
        "predicate": {"model": model, "version": version},
    }, indent=2).encode()


def parse_release(payload: bytes, where: str) -> tuple[str, str, str]:
    """Returns (model, version, subject digest) from a verified payload."""
    st = strict_json(payload, where, "release")
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != RELEASE_PREDICATE:
        raise VerificationError(where, "release", f"not an in-toto statement with predicateType {RELEASE_PREDICATE}")
    subjects, pred = st.get("subject"), st.get("predicate")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict) or not isinstance(pred, dict):
        raise VerificationError(where, "release", "must have exactly one subject and a predicate")
    digest = (subjects[0].get("digest") or {}).get("sha256")
    model, version = pred.get("model"), pred.get("version")
    if not isinstance(digest, str) or not isinstance(model, str) or subjects[0].get("name") != model:
        raise VerificationError(where, "release", "subject name, digest or predicate.model missing or inconsistent")
    try:
        parse_version(version)
    except ValueError as e:
        raise VerificationError(where, "release", str(e)) from None
    return model, version, digest


class VersionStore:
    """The highest accepted version per model, in a root-only state file."""

    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.path = os.path.join(state_dir, STATE_FILE)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        st = os.stat(state_dir, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise VerificationError(state_dir, "rollback", "the state directory must be a directory owned by the daemon with mode 0700")

    def read(self) -> dict[str, str | dict]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        versions = strict_json(data, self.path, "rollback")
        if not isinstance(versions, dict) or not all(
                isinstance(v, str) or (isinstance(v, dict) and set(v) == {"version", "digest"}
                                       and all(isinstance(x, str) for x in v.values()))
                for v in versions.values()):
            raise VerificationError(self.path, "rollback", "not a JSON object of model -> version")
        return versions

    def entry(self, model: str) -> tuple[str, str | None] | None:
        """(highest accepted version, the digest it was accepted with if the
        version was stated by the operator, else None), or None."""
        v = self.read().get(model)
        if v is None:
            return None
        return (v, None) if isinstance(v, str) else (v["version"], v["digest"])

    def get(self, model: str) -> str | None:
        e = self.entry(model)
        return e[0] if e else None

    def record(self, model: str, version: str, digest: str | None = None) -> None:
        """Raises the recorded version to `version` if it is higher (with
        `digest` when the operator stated the version). The single daemon
        process is the only writer; callers serialize per model."""
        versions = self.read()
        old = self.entry(model)
        if old is not None and parse_version(old[0]) >= parse_version(version):
            return
        versions[model] = version if digest is None else {"version": version, "digest": digest}
        tmp = f"{self.path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(versions, indent=1, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)  # the rename itself must survive a crash
        finally:
            os.close(dfd)


def check_version(model: str, version: str | None, release_where: str, policy: TrustPolicy,
                  recorded: str | None, *, stated: bool = False, digest: str | None = None,
                  recorded_digest: str | None = None) -> None:
    """The rollback decision. `version` is None when there is neither a release
    statement nor a version stated in the policy; `stated` says the version
    comes from the policy (then `digest` is the content's manifest digest and
    `recorded_digest` the one the recorded version was accepted with)."""
    if version is None:
        if policy.min_version is not None:
            raise VerificationError(release_where, "rollback", f"no signed release statement, but the policy requires version >= {policy.min_version}")
        if recorded is not None and not policy.allow_downgrade:
            raise VerificationError(release_where, "rollback", f"no signed release statement, but version {recorded} was accepted before")
        return
    what = f"version {version} (stated in the policy)" if stated else f"version {version}"
    if policy.min_version is not None and parse_version(version) < parse_version(policy.min_version):
        raise VerificationError(release_where, "rollback", f"{what} is below the policy's min_version {policy.min_version}")
    if recorded is None or policy.allow_downgrade:
        return
    same_content = stated and recorded_digest is not None and digest == recorded_digest
    if parse_version(version) < parse_version(recorded) and not same_content:
        raise VerificationError(release_where, "rollback", f"{what} is lower than version {recorded} accepted before for {model!r} (allow_downgrade is false)")
    if stated and parse_version(version) == parse_version(recorded) and recorded_digest is not None and not same_content:
        raise VerificationError(release_where, "rollback", f"{what} was accepted before for {model!r} with manifest digest "
                                f"{recorded_digest}, not {digest}: new content needs a higher version (allow_downgrade is false)")
