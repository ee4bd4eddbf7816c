"""`sealbox demo --once`: build, sign, serve and call the demo model, as the README's first command does."""
import pathlib
import subprocess

import numpy as np

from tests.support import PYTHON
from sealbox.client.demo_model import demo_function, demo_weights

SEALBOX = str(pathlib.Path(PYTHON).with_name("sealbox"))


def test_demo_once(tmp_path):
    directory = tmp_path / "demo"
    result = subprocess.run([SEALBOX, "demo", "--once", "--dir", str(directory)], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    x = np.load(directory / "x.npy")
    y = demo_function(x, **demo_weights())
    printed = result.stdout.split("y = demo(x) =\n", 1)[1].split("\n\n", 1)[0]
    values = np.array([float(v) for v in printed.replace("[", " ").replace("]", " ").split()], np.float32)
    np.testing.assert_allclose(values.reshape(y.shape), y, rtol=1e-5, atol=1e-5)
    assert f"{SEALBOX} --target unix:{directory}/sealbox.sock infer demo --input x={directory}/x.npy" in result.stdout
    assert (directory / "model" / "model.sig").exists()
    # A second run reuses the signed model and the key.
    again = subprocess.run([SEALBOX, "demo", "--once", "--dir", str(directory)], capture_output=True, text=True,
                           timeout=180)
    assert again.returncode == 0, again.stderr
