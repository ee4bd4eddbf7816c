"""The `sealbox` CLI against a real daemon: models, status, infer, load, unload, and its exit codes."""
import pathlib
import subprocess

import numpy as np
import pytest

from tests.support import PYTHON
from tests.support.models import reference

SEALBOX = str(pathlib.Path(PYTHON).with_name("sealbox"))


@pytest.fixture
def cli(daemon_factory, demo_model, keys):
    daemon = daemon_factory({"demo": {"path": demo_model}}, keys[1]).start()

    def run(*args):
        return subprocess.run([SEALBOX, "--target", daemon.target, *map(str, args)], capture_output=True,
                              text=True, timeout=120)
    return run


def test_cli_commands(cli, tmp_path):
    models = cli("models")
    assert models.returncode == 0 and models.stdout == "demo\tREADY\t-\t\n"
    status = cli("status", "demo")
    assert status.returncode == 0
    assert status.stdout.splitlines() == ["model:   demo", "state:   READY", "version: -", "engine:  mlx",
                                          "input:   x FP32 [-1, 4]", "output:  y FP32 [-1, 3]"]
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    infer = cli("infer", "demo", "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", tmp_path)
    assert infer.returncode == 0, infer.stderr
    assert infer.stdout == f"y: float32 [5, 3] -> {tmp_path / 'y.npy'}\n"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference(x), rtol=1e-5, atol=1e-5)
    assert cli("unload", "demo").stdout == "demo: unloaded\n"
    assert cli("models").stdout == "demo\tUNLOADED\t-\tunloaded\n"
    assert cli("load", "demo").stdout == "demo: loaded\n"
    assert cli("models").stdout.startswith("demo\tREADY")


def test_cli_errors(cli, tmp_path):
    unknown = cli("status", "nope")
    assert unknown.returncode == 1 and unknown.stderr == "sealbox: unknown model 'nope'\n"
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    bad = cli("infer", "demo", "--input", f"x={tmp_path / 'bad.npy'}")
    assert bad.returncode == 1
    assert bad.stderr == "sealbox: INVALID_ARGUMENT: input 'x': shape [2, 3], expected [-1, 4] (-1 = any size)\n"
    usage = cli("infer", "demo", "--input", "x")
    assert usage.returncode == 2 and usage.stderr == "sealbox infer: --input must be NAME=FILE.npy, not 'x'\n"
    missing = cli("infer", "demo", "--input", f"x={tmp_path / 'missing.npy'}")
    assert missing.returncode == 2 and missing.stderr.startswith(f"sealbox infer: {tmp_path / 'missing.npy'}: "
                                                                 "cannot read as .npy: ")
