"""Shared fixtures: real signing keys, real signed models, a real sealboxd in a subprocess.

Tests are grouped by layer: unit/ (any machine, any user), sandbox/ (real sandboxes, as root) and
daemon/ (a whole sealboxd, as root). Tests under sandbox/ and daemon/ are marked `root`, so
`pytest -m "not root"` runs the rest anywhere; as a non-root user they are skipped with that reason.
Helpers live in tests/support (shared with benchmarks/).
"""
from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

from tests.support.daemon import Daemon
from tests.support.pki import make_ec_key, upstream_sign

ROOT_LAYERS = ("sandbox", "daemon", "transfer")


def pytest_collection_modifyitems(config, items):
    here = pathlib.Path(__file__).resolve().parent
    for item in items:
        try:
            layer = pathlib.Path(item.fspath).resolve().relative_to(here).parts[0]
        except ValueError:
            continue
        if layer in ROOT_LAYERS:
            item.add_marker(pytest.mark.root)
        if item.get_closest_marker("root") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root: it starts sandboxes as the worker user"))


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    return make_ec_key(directory)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory, keys):
    """The built-in demo MLX model, signed with the upstream tool."""
    from sealbox.client.demo_model import build_demo_model

    path = tmp_path_factory.mktemp("models") / "demo"
    build_demo_model(str(path))
    upstream_sign(path, keys[0])
    return path


@pytest.fixture
def daemon_factory(tmp_path):
    daemons = []

    def make(models, public_key, **kwargs) -> Daemon:
        directory = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
        daemon = Daemon(directory, models, public_key, **kwargs)
        daemons.append(daemon)
        return daemon
    yield make
    for daemon in daemons:
        daemon.stop()
