"""format = "mlx-lm" in the config, the worker's profile and the worker contract (issue 14)."""
from __future__ import annotations

import pytest

from sealbox.daemon.config import ConfigError, load_config
from sealbox.proto.contract import ModelHandoff, SandboxSpec, SpecError, WorkerSpec
from sealbox.sandbox.profile import SandboxProfile


def _config(tmp_path, model: str) -> str:
    from tests.support.pki import make_ec_key
    _, public = make_ec_key(tmp_path)
    path = tmp_path / "sealboxd.toml"
    path.write_text(f'[policy]\nsources = ["{tmp_path}"]\npublic_keys = ["{public}"]\n'
                    f'[models.m]\npath = "{tmp_path}/m"\n{model}\n')
    return str(path)


def test_limits_are_read_for_mlx_lm_models(tmp_path):
    cfg = load_config(_config(tmp_path, 'format = "mlx-lm"\nmax_prompt_tokens = 100\nmax_new_tokens = 20\n'
                                        'request_time_s = 7.5'))
    assert dict(cfg.models["m"].engine_options) == {"max_prompt_tokens": 100, "max_new_tokens": 20,
                                                    "request_time_s": 7.5}


@pytest.mark.parametrize("model, message", [
    ('format = "mlx"\nmax_new_tokens = 5', "key 'max_new_tokens' is for format = \"mlx-lm\" models only"),
    ('format = "mlx-lm"\ninfer_timeout_s = 5', "key 'infer_timeout_s' does not apply to format = \"mlx-lm\": "
                                               "its per-request time budget is 'request_time_s'"),
    ('format = "mlx-lm"\nmax_new_tokens = 2.5', "key 'max_new_tokens' must be int, not float"),
    ('format = "mlx-lm"\nrequest_time_s = 0', "key 'request_time_s' must be positive, not 0"),
])
def test_bad_limits_are_refused(tmp_path, model, message):
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, model))
    assert str(err.value).endswith(f"[models.m]: {message}")


def test_the_mlx_lm_profile():
    profile = SandboxProfile.for_model("mlx-lm", memory_bytes=2**30, infer_timeout_s=30,
                                       engine_options=(("request_time_s", 50.0),), weights_bytes=3 * 2**30)
    assert profile.nofile == 4096 and profile.symlink_dirs == ("/tmp",)
    assert profile.infer_timeout_s == 60.0                       # the budget + 10 s, not infer_timeout_s
    assert profile.memory_bytes == 512 * 2**20 + 6 * 2**30       # sized from the weights
    assert SandboxProfile.for_model("mlx-lm", memory_bytes=8 * 2**30, weights_bytes=2**20).memory_bytes == 8 * 2**30
    env = profile.worker_environment()
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    other = SandboxProfile.for_model("mlx", weights_bytes=3 * 2**30)
    assert (other.nofile, other.symlink_dirs, other.memory_bytes) == (256, (), 2 * 2**30)


def test_engine_options_travel_in_the_worker_spec():
    spec = WorkerSpec(SandboxSpec("mlx-lm", symlink_dirs=("/tmp",)),
                      ModelHandoff(engine_options={"max_new_tokens": 5, "request_time_s": 2.5}))
    back = WorkerSpec.from_json(spec.to_json())
    assert back.model.engine_options == {"max_new_tokens": 5, "request_time_s": 2.5}
    assert back.sandbox.symlink_dirs == ("/tmp",)
    bad = spec.to_json().replace('"max_new_tokens": 5', '"max_new_tokens": "5"')
    with pytest.raises(SpecError, match="engine_options must map names to numbers"):
        WorkerSpec.from_json(bad)
