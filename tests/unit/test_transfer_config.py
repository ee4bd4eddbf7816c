"""[models.NAME] source = ...: the config's checks, each fed the bad thing, with the exact error."""
from __future__ import annotations

import pytest

from tests.support.pki import write_key

from sealbox.daemon.config import ConfigError, load_config


def config(tmp_path, model: str, sources='"https://models.example.com/"') -> str:
    _, pub = write_key(tmp_path / "k.pem")
    path = tmp_path / "sealboxd.toml"
    path.write_text(f"""[policy]
sources = [{sources}]
public_keys = ["{pub}"]
[models.m]
{model}
""")
    return str(path)


def test_https_and_oci_sources_accepted(tmp_path):
    cfg = load_config(config(tmp_path, 'source = "https://models.example.com/m"\nfetch_timeout_s = 5'))
    assert cfg.models["m"].source == "https://models.example.com/m/" and cfg.models["m"].fetch_timeout_s == 5
    cfg = load_config(config(tmp_path, 'source = "oci://reg.example.com/models/m:1.0"',
                             sources='"oci://reg.example.com/models/"'))
    assert cfg.models["m"].source == "oci://reg.example.com/models/m:1.0"


@pytest.mark.parametrize("model, sources, error", [
    ('path = "/srv/m"\nsource = "https://models.example.com/m/"', None,
     "exactly one of the keys 'path' (a local directory) and 'source' (an https://, oci:// or sftp:// location) is required"),
    ('source = "http://models.example.com/m/"', None,
     "key 'source': http:// is not a secure transfer; only https://, oci:// and sftp:// locations are fetched "
     "(http, ftp and file are refused)"),
    ('source = "https://elsewhere.example.com/m/"', None,
     "key 'source': not under an allowed source URL (https://models.example.com/)"),
    ('source = "sftp://u@h.example.com/m/"', '"sftp://u@h.example.com/"',
     "an sftp:// source needs 'ssh_key' (key authentication only) and 'known_hosts' (the pinned host key; "
     "no trust on first use)"),
    ('source = "https://models.example.com/m/"\nknown_hosts = "/etc/k"', None,
     "keys 'ssh_key' and 'known_hosts' are for an sftp:// source only"),
    ('path = "/srv/m"\nsource_ca = "/etc/ca.pem"', None, "keys 'source_ca' and 'fetch_timeout_s' need 'source'"),
])
def test_bad_sources_refused(tmp_path, model, sources, error):
    path = config(tmp_path, model, sources or '"https://models.example.com/", "/srv"')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: [models.m]: {error}"
