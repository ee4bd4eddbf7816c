"""The command lines as a user meets them: --version, descriptions, keygen, verify's defaults and hints,
a closed pipe, and what the daemon's own environment must hold."""
from __future__ import annotations

import pathlib
import stat
import subprocess
import tomllib

from sealbox import __version__
from tests.support import PYTHON, REPO
from tests.support.pki import make_model, sealbox_cli

BIN = pathlib.Path(PYTHON).parent


def command(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs)


def test_version_on_both_commands():
    for name in ("sealbox", "sealboxd"):
        r = command(BIN / name, "--version")
        assert (r.returncode, r.stdout, r.stderr) == (0, f"{name} {__version__}\n", "")


def test_models_status_load_unload_have_descriptions():
    for sub, words in (("models", "one line each"), ("status", "input and output tensors"),
                       ("load", "trust policy"), ("unload", "stays configured")):
        r = command(BIN / "sealbox", sub, "--help")
        assert r.returncode == 0 and words in " ".join(r.stdout.split()), (sub, r.stdout)


def test_keygen_makes_a_key_that_signs_and_verifies(tmp_path):
    key = tmp_path / "publisher.pem"
    r = sealbox_cli("keygen", key)
    assert r.returncode == 0, r.stderr
    pub = tmp_path / "publisher.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and pub.exists()
    signer = r.stdout.splitlines()[-1].removeprefix("signer ")
    assert signer.startswith("key:sha256:")
    again = sealbox_cli("keygen", key)   # never overwritten
    assert again.returncode == 2 and "File exists" in again.stderr

    model = make_model(tmp_path / "m")
    assert sealbox_cli("sign", "key", model, "--private-key", key).returncode == 0
    # --signature defaults to MODEL_DIR/model.sig
    verified = sealbox_cli("verify", model, "--public-key", pub)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.rstrip().endswith(f"signer {signer}")


def test_verify_hints_at_model_name_when_the_release_names_another_model(tmp_path):
    key = tmp_path / "k.pem"
    assert sealbox_cli("keygen", key).returncode == 0
    model = make_model(tmp_path / "checkout")
    r = sealbox_cli("sign", "key", model, "--private-key", key, "--version", "2", "--model-name", "mnist")
    assert r.returncode == 0, r.stderr
    refused = sealbox_cli("verify", model, "--public-key", tmp_path / "k.pub")
    assert refused.returncode == 1
    lines = refused.stderr.splitlines()
    assert lines[0].endswith("release: is for model 'mnist', not 'checkout'")
    assert lines[1] == ("sealbox verify: hint: the model name defaults to the directory's name 'checkout'; "
                        "if the daemon serves it as 'mnist', say --model-name 'mnist'")
    ok = sealbox_cli("verify", model, "--public-key", tmp_path / "k.pub", "--model-name", "mnist")
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("version 2"), ok.stderr


def test_a_closed_pipe_is_no_traceback(tmp_path):
    model = make_model(tmp_path / "m", {f"f{i:04}.bin": b"x" for i in range(2000)})
    proc = subprocess.Popen([str(BIN / "sealbox"), "hash", str(model)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()   # the reader is gone before the first line (`sealbox hash M | head -0`)
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert stderr == "" and proc.returncode == 2


def test_the_daemons_dependencies_hold_no_engine_only_or_test_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].split(";")[0].strip()
             for d in project["dependencies"]}
    assert "juliacall" not in names and "psutil" not in names
    extras = project["optional-dependencies"]
    assert any(d.startswith("juliacall") for d in extras["julia"])
    assert any(d.startswith("psutil") for d in extras["test"])
