"""policy_from_toml: the documented example loads, every mistake names the key."""
from __future__ import annotations

import tomllib

import pytest

from tests.support.pki import PKI, write_key  # noqa: E402

from sealbox.daemon.config import ConfigError, policy_from_toml  # noqa: E402
from sealbox.trust.policy import parse_version  # noqa: E402

WHERE = "/etc/sealbox/sealbox.toml: [models.mnist.policy]"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    _, pub = write_key(d / "publisher.pem")
    pki = PKI(d / "pki")
    return {"pub": pub, "root": pki.root, "dir": d}


def example(files) -> str:
    # Kept in step with the example in SECURITY.md ("The trust policy in the daemon config").
    return f"""
[policy]
sources = ["{files['dir']}", "https://models.example.com/"]
public_keys = ["{files['pub']}"]
clock_skew_seconds = 120

[models.mnist.policy]
certificates = [{{ roots = "{files['root']}", identities = ["email:publisher@example.com", "subject:CN=signer"] }}]
min_version = "1.4"
model_name = "mnist"
max_bytes = 1073741824
ignore_paths = ["README.md"]

[models.legacy.policy]
require_signature = false
pinned_files = {{ "model.safetensors" = "sha256:{'ab' * 32}" }}
"""


def test_documented_example_loads_with_defaults(files):
    doc = tomllib.loads(example(files))
    defaults = policy_from_toml(doc["policy"], "sealbox.toml: [policy]")
    mnist = policy_from_toml(doc["models"]["mnist"]["policy"], WHERE, defaults)
    assert mnist.sources == (str(files["dir"].resolve()),)
    assert mnist.source_urls == ("https://models.example.com/",)
    assert [k.path for k in mnist.public_keys] == [str(files["pub"])]  # inherited
    assert mnist.certificates[0].identities == ("email:publisher@example.com", "subject:CN=signer")
    assert mnist.model_name == "mnist" and defaults.model_name is None
    assert mnist.min_version == "1.4" and mnist.max_bytes == 1 << 30 and mnist.clock_skew_seconds == 120
    assert mnist.require_signature and not mnist.allow_downgrade and mnist.signature == "model.sig"
    legacy = policy_from_toml(doc["models"]["legacy"]["policy"], WHERE, defaults)
    assert not legacy.require_signature and legacy.pinned_files == (("model.safetensors", "ab" * 32),)
    assert legacy.model_name is None
    assert "BEGIN" not in mnist.describe()


@pytest.mark.parametrize("table, message", [
    ({"sources": ["/srv"], "public_keys": ["/x.pub"], "colour": 1}, "colour: unknown key (known: "),
    ({"public_keys": ["PUB"]}, "sources: is required: the directories models may be loaded from"),
    ({"sources": ["srv/models"], "public_keys": ["PUB"]}, "sources: 'srv/models' is neither an absolute directory nor an https://, oci:// or sftp:// URL prefix (http://, ftp:// and file:// are not secure transfers)"),
    ({"sources": ["http://models.example.com/"], "public_keys": ["PUB"]}, "sources: 'http://models.example.com/' is neither an absolute directory nor an https://, oci:// or sftp:// URL prefix (http://, ftp:// and file:// are not secure transfers)"),
    ({"sources": ["/srv"]}, "require_signature: is true but none of public_keys, certificates or sigstore is set"),
    ({"sources": ["/srv"], "public_keys": ["relative.pub"]}, "public_keys: 'relative.pub' must be an absolute path"),
    ({"sources": ["/srv"], "public_keys": ["/nonexistent.pub"]}, "public_keys: /nonexistent.pub: [Errno 2] No such file or directory: '/nonexistent.pub'"),
    ({"sources": ["/srv"], "public_keys": ["ROOT"]}, "public_keys: ROOT: not a PEM public key ("),
    ({"sources": ["/srv"], "certificates": [{"roots": "ROOT"}]}, "certificates[0]: must be a table with exactly the keys roots and identities"),
    ({"sources": ["/srv"], "certificates": [{"roots": "ROOT", "identities": []}]}, "certificates[0].identities: must be a non-empty list: a certificate signer is always pinned"),
    ({"sources": ["/srv"], "certificates": [{"roots": "ROOT", "identities": ["alice"]}]}, "certificates[0].identities: 'alice' must be email:ADDRESS (or a bare e-mail address), uri:URI or subject:RFC4514-NAME"),
    ({"sources": ["/srv"], "certificates": [{"roots": "PUB", "identities": ["email:a@b"]}]}, "certificates[0].roots: PUB: not PEM certificates ("),
    ({"sources": ["/srv"], "sigstore": [{"trusted_root": "ROOT", "identities": ["a@b"]}]}, "sigstore[0]: must be a table with exactly the keys trusted_root, identities and issuer"),
    ({"sources": ["/srv"], "sigstore": [{"trusted_root": "ROOT", "identities": [], "issuer": "https://i"}]}, "sigstore[0].identities: must be a non-empty list of e-mail addresses or URIs: a keyless signer is always pinned"),
    ({"sources": ["/srv"], "sigstore": [{"trusted_root": "ROOT", "identities": ["a@b"], "issuer": "accounts"}]}, "sigstore[0].issuer: 'accounts' must be the https:// URL of the OIDC issuer"),
    ({"sources": ["/srv"], "sigstore": [{"trusted_root": "ROOT", "identities": ["a@b"], "issuer": "https://i"}]}, "sigstore[0].trusted_root: ROOT: not a Sigstore trusted_root.json ("),
    ({"sources": ["/srv"], "require_signature": False}, "require_signature: is false: exactly one of pinned_files or pinned_manifest must pin the digests"),
    ({"sources": ["/srv"], "require_signature": False, "pinned_files": {"a": "md5:00"}}, "pinned_files: a: 'md5:00' must be sha256: and 64 lowercase hex digits"),
    ({"sources": ["/srv"], "require_signature": "yes", "public_keys": ["PUB"]}, "require_signature: must be true or false"),
    ({"sources": ["/srv"], "public_keys": ["PUB"], "min_version": "v1.2"}, "min_version: version 'v1.2' is not dot-separated decimal numbers such as 1.2.0"),
    ({"sources": ["/srv"], "public_keys": ["PUB"], "max_bytes": 0}, "max_bytes: must be positive"),
    ({"sources": ["/srv"], "public_keys": ["PUB"], "clock_skew_seconds": True}, "clock_skew_seconds: must be an integer number of seconds"),
    ({"sources": ["/srv"], "public_keys": ["PUB"], "signature": "../model.sig"}, "signature: '../model.sig' must be a file name inside the model directory or an absolute path"),
    ({"sources": ["/srv"], "public_keys": ["PUB"], "ignore_paths": ["../etc"]}, "ignore_paths: '../etc' must be a relative name inside the model directory"),
    ({"sources": ["/srv"], "public_keys": ["PUB"], "model_name": ""}, "model_name: '' must be 1 to 255 printable characters: the name the signature carries"),
    ({"sources": ["/srv"], "public_keys": ["PUB"], "model_name": "a\nb"}, "model_name: 'a\\nb' must be 1 to 255 printable characters: the name the signature carries"),
    ({"sources": ["/srv"], "public_keys": ["PUB"], "model_name": 3}, "model_name: must be a model name"),
    ({"sources": ["/srv"], "require_signature": False, "pinned_files": {"a": "sha256:" + "ab" * 32}, "model_name": "a"},
     "model_name: needs a signature (require_signature = true): pinned digests carry no model name"),
])
def test_mistakes_name_the_key(files, table, message):
    def fill(v):
        if isinstance(v, str):
            return v.replace("PUB", str(files["pub"])).replace("ROOT", str(files["root"]))
        if isinstance(v, list):
            return [fill(x) for x in v]
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return v
    with pytest.raises(ConfigError) as info:
        policy_from_toml(fill(table), WHERE)
    assert str(info.value).startswith(f"{WHERE}: {fill(message)}")


def test_versions_compare_numerically():
    assert parse_version("1.10") > parse_version("1.9")
    assert parse_version("1.2") == parse_version("1.2.0")
    for bad in ("", "1.", "1.a", "-1", "1..2", "01.2.3.4.5.6.7.8.9"):
        with pytest.raises(ValueError):
            parse_version(bad)
