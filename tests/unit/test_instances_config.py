"""The `instances` key: a [workers] default and a per-model override, bounded."""
from __future__ import annotations

import pytest

from sealbox.daemon.config import ConfigError, load_config


def config(tmp_path, workers: str = "", model: str = "") -> str:
    from tests.support.pki import make_ec_key
    _, public = make_ec_key(tmp_path)
    path = tmp_path / "sealboxd.toml"
    path.write_text(f"[workers]\n{workers}\n[policy]\nsources = [\"{tmp_path}\"]\npublic_keys = [\"{public}\"]\n"
                    f"[models.a]\npath = \"{tmp_path}/a\"\n{model}\n[models.b]\npath = \"{tmp_path}/b\"\n")
    return str(path)


def test_instances_default_and_override(tmp_path):
    cfg = load_config(config(tmp_path))
    assert (cfg.workers.instances, cfg.models["a"].instances, cfg.models["b"].instances) == (1, 1, 1)
    cfg = load_config(config(tmp_path, "instances = 3", "instances = 2"))
    assert (cfg.workers.instances, cfg.models["a"].instances, cfg.models["b"].instances) == (3, 2, 3)


@pytest.mark.parametrize("value, message", [
    ("0", "key 'instances' must be positive, not 0"),
    ("17", "key 'instances' must be at most 16, not 17"),
    ("1.5", "key 'instances' must be int, not float"),
    ('"2"', "key 'instances' must be int, not str"),
])
def test_instances_refused(tmp_path, value, message):
    with pytest.raises(ConfigError, match=r"\[models\.a\]: " + message.replace("'", "'")):
        load_config(config(tmp_path, model=f"instances = {value}"))
    with pytest.raises(ConfigError, match=r"\[workers\]: " + message):
        load_config(config(tmp_path, workers=f"instances = {value}"))
