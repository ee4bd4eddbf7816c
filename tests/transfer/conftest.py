"""Fixtures shared by the transfer tests: a signing key and a real nginx (each made once per module)."""
from __future__ import annotations

import pytest

from tests.support.https import Nginx
from tests.support.pki import write_key


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    server = Nginx(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return write_key(tmp_path_factory.mktemp("keys") / "signer.pem")
