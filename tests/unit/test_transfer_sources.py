"""Source prefixes bound locations and redirects by scheme, host, port and whole path segments.

Each case feeds the location that plain `startswith` let through (a longer host, a sibling directory
sharing the prefix's name, an encoded or literal '..') and checks the exact refusal.
"""
from __future__ import annotations

import pytest

from sealbox.daemon.config import ConfigError, policy_from_toml
from sealbox.transfer.fetch import check_location, path_problem, under, under_sources
from sealbox.trust import TrustPolicy, VerificationError


def pol(*urls: str) -> TrustPolicy:
    return TrustPolicy(source_urls=urls)


@pytest.mark.parametrize("url, prefix", [
    ("https://models.example.com/m/", "https://models.example.com"),
    ("https://models.example.com/m/", "https://models.example.com/"),
    ("https://models.example.com:443/m/", "https://models.example.com/"),
    ("https://MODELS.example.com/team/m/", "https://models.example.com/team"),
    ("https://models.example.com/team/m/model.sig", "https://models.example.com/team/"),
    ("https://models.example.com/team/", "https://models.example.com/team"),
    ("https://models.example.com/team/./m/", "https://models.example.com/team/"),
    ("oci://reg.example.com/models/m:1.0", "oci://reg.example.com/models/"),
    ("oci://reg.example.com/models/m@sha256:" + "a" * 64, "oci://reg.example.com/models"),
    ("oci://reg.example.com/models/m:1.0", "oci://reg.example.com/models/m"),
    ("oci://reg.example.com/models/m:1.0", "oci://reg.example.com/models/m:1.0"),
    ("oci://reg.example.com:5000/models/m:1.0", "oci://reg.example.com:5000/"),
    ("sftp://u@files.example.com/srv/m/", "sftp://u@files.example.com/srv"),
    ("sftp://u@files.example.com/srv/m/", "sftp://files.example.com/srv/"),
])
def test_under(url, prefix):
    assert under(url, prefix)


@pytest.mark.parametrize("url, prefix", [
    ("https://models.example.com.evil.net/m/", "https://models.example.com"),
    ("https://models.example.com.evil.net/m/", "https://models.example.com/"),
    ("https://models.example.com@evil.net/m/", "https://models.example.com"),
    ("https://models.example.com:8443/m/", "https://models.example.com/"),
    ("https://models.example.com/team-evil/m/", "https://models.example.com/team"),
    ("https://models.example.com/team-evil/m/", "https://models.example.com/team/"),
    ("https://models.example.com/teamx", "https://models.example.com/team"),
    ("https://models.example.com/team/../private/", "https://models.example.com/team/"),
    ("https://models.example.com/team/%2e%2e/private/", "https://models.example.com/team/"),
    ("https://models.example.com/team/%2E%2E%2Fprivate/", "https://models.example.com/team/"),
    ("https://models.example.com/team/..%5cprivate/", "https://models.example.com/team/"),
    ("https://models.example.com/", "https://models.example.com/team/"),
    ("oci://reg.example.com/models-evil/m:1.0", "oci://reg.example.com/models"),
    ("oci://reg.example.com/models/m-evil:1.0", "oci://reg.example.com/models/m"),
    ("oci://reg.example.com/models/m:2.0", "oci://reg.example.com/models/m:1.0"),
    ("oci://reg.example.com/models/m/sub:1.0", "oci://reg.example.com/models/m:1.0"),
    ("oci://reg.example.com.evil.net/models/m:1.0", "oci://reg.example.com/"),
    ("oci://reg.example.com:5001/models/m:1.0", "oci://reg.example.com:5000/"),
    ("https://reg.example.com/models/m/", "oci://reg.example.com/models/"),
    ("sftp://other@files.example.com/srv/m/", "sftp://u@files.example.com/srv"),
    ("sftp://u@files.example.com/srv-evil/m/", "sftp://u@files.example.com/srv"),
    ("sftp://u@files.example.com:2222/srv/m/", "sftp://u@files.example.com/srv"),
])
def test_not_under(url, prefix):
    assert not under(url, prefix)


ENCODED = "a percent-encoded '.', '/', '\\' or NUL, or a backslash, in the path is refused (servers decode them)"


@pytest.mark.parametrize("location, sources, why", [
    ("https://models.example.com.evil.net/m/", ("https://models.example.com",),
     "not under an allowed source URL (https://models.example.com)"),
    ("https://models.example.com/team-evil/m/", ("https://models.example.com/team",),
     "not under an allowed source URL (https://models.example.com/team)"),
    ("oci://reg.example.com/models-evil/m:1", ("oci://reg.example.com/models",),
     "not under an allowed source URL (oci://reg.example.com/models)"),
    ("sftp://u@files.example.com/srv-evil/m/", ("sftp://u@files.example.com/srv",),
     "not under an allowed source URL (sftp://u@files.example.com/srv)"),
    ("https://models.example.com/team/%2e%2e/private/", ("https://models.example.com/team/",), ENCODED),
    ("https://models.example.com/team/.%2E/private/", ("https://models.example.com/team/",), ENCODED),
    ("https://models.example.com/team%2fm/", ("https://models.example.com/",), ENCODED),
    ("https://models.example.com/team/m\\..\\x/", ("https://models.example.com/team/",), ENCODED),
    ("sftp://u@files.example.com/srv/%2e%2e/etc/", ("sftp://u@files.example.com/srv/",), ENCODED),
    ("sftp://u@files.example.com/srv/../etc/", ("sftp://u@files.example.com/srv/",), "a '..' path segment is refused"),
    ("https://models.example.com/team/../private/", ("https://models.example.com/team/",),
     "a '..' path segment is refused"),
])
def test_check_location_refuses(location, sources, why):
    with pytest.raises(VerificationError) as info:
        check_location(location, pol(*sources))
    assert str(info.value) == f"{location}: source: {why}"


def test_redirect_targets_use_the_same_boundary():
    p = pol("https://models.example.com/team/")
    assert under_sources("https://models.example.com/team/m/model.sig", p.source_urls)
    for target in ("https://models.example.com/team-evil/m/model.sig", "https://models.example.com.evil.net/team/m",
                   "http://models.example.com/team/m/model.sig", "https://models.example.com/team/../x/model.sig",
                   "https://models.example.com/team/%2e%2e/x/model.sig"):
        assert not under_sources(target, p.source_urls), target
    assert path_problem("https://models.example.com/team/%2e%2e/x") is not None
    assert path_problem("https://models.example.com/team/m/a%20b.bin") is None


@pytest.mark.parametrize("prefix, why", [
    ("https://models.example.com/%2e%2e/", "a percent-encoded '.', '/', '\\' or NUL, or a backslash, in the path is "
     "refused (servers decode them)"),
    ("https://models.example.com/a/../b/", "a '..' path segment is refused"),
    ("https:///models/", "a URL prefix has no host"),
    ("https://models.example.com/?x=1", "a URL prefix has no query or fragment"),
    ("https://models.example.com:99999/", "not a valid URL (Port out of range 0-65535)"),
])
def test_bad_source_prefix_refused_in_config(prefix, why):
    with pytest.raises(ConfigError) as info:
        policy_from_toml({"sources": [prefix]}, "t")
    assert str(info.value) == f"t: sources: {prefix!r}: {why}"


@pytest.mark.parametrize("value, why", [(0, "must be positive"), (-1, "must be positive"),
                                        ("10", "must be an integer number of files"),
                                        (True, "must be an integer number of files")])
def test_max_files_checked_in_config(value, why):
    base = {"sources": ["https://models.example.com/"], "require_signature": False,
            "pinned_files": {"a.bin": "sha256:" + "0" * 64}}
    assert policy_from_toml(dict(base, max_files=5), "t").max_files == 5
    assert policy_from_toml(base, "t").max_files == 10_000
    with pytest.raises(ConfigError) as info:
        policy_from_toml(dict(base, max_files=value), "t")
    assert str(info.value) == f"t: max_files: {why}"
