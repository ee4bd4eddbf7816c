"""The `instances` key (a [workers] default and a per-model override, bounded) and the dynamic
batching keys, as far as the worker's spec."""
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


def test_batching_keys(tmp_path):
    from sealbox.proto.contract import Batching, ModelHandoff, SandboxSpec, WorkerSpec
    cfg = load_config(config(tmp_path, model="max_batch_size = 8\nmax_queue_delay_us = 100\n"
                                             "preferred_batch_sizes = [8, 4, 4]"))
    assert cfg.models["a"].batching == Batching(8, 100, (4, 8)) and cfg.models["b"].batching is None
    # It reaches the worker in its spec, checked there too.
    spec = WorkerSpec(SandboxSpec("mlx"), ModelHandoff(files={"m": 3}, batching=cfg.models["a"].batching))
    assert WorkerSpec.from_json(spec.to_json()) == spec
    assert WorkerSpec.from_json(WorkerSpec(SandboxSpec("mlx")).to_json()).model.batching is None


@pytest.mark.parametrize("keys, message", [
    ("max_batch_size = -1", "key 'max_batch_size' must be 0 \\(off\\) to 1024, not -1"),
    ("max_batch_size = 2000", "key 'max_batch_size' must be 0 \\(off\\) to 1024, not 2000"),
    ("max_queue_delay_us = 5", "keys 'max_queue_delay_us' and 'preferred_batch_sizes' need 'max_batch_size'"),
    ("max_batch_size = 4\nmax_queue_delay_us = -1", "key 'max_queue_delay_us' must be 0 to 10000000, not -1"),
    ("max_batch_size = 4\npreferred_batch_sizes = [2, 8]",
     "key 'preferred_batch_sizes' must be sizes from 1 to max_batch_size \\(4\\), not \\[2, 8\\]"),
    ("max_batch_size = 4\npreferred_batch_sizes = [0]",
     "key 'preferred_batch_sizes' must be sizes from 1 to max_batch_size \\(4\\), not \\[0\\]"),
])
def test_batching_refused(tmp_path, keys, message):
    with pytest.raises(ConfigError, match=r"\[models\.a\]: " + message):
        load_config(config(tmp_path, model=keys))


def test_malformed_batching_spec_refused():
    import json
    from sealbox.proto.contract import SpecError, WorkerSpec
    good = json.loads(WorkerSpec.from_json('{"sandbox": {"engine": "mlx"}, "model": {}}').to_json())
    for batching in ({"max_batch_size": 0}, {"max_batch_size": 4, "preferred_batch_sizes": [5]},
                     {"max_batch_size": 4, "max_queue_delay_us": -1}, {"max_batch_size": 4, "x": 1}):
        good["model"]["batching"] = batching
        with pytest.raises(SpecError):
            WorkerSpec.from_json(json.dumps(good))


def test_model_config_with_batching_parses_as_tritons_own():
    """The ModelConfig sealbox serves for a batching model, read with tritonclient's own model_config.proto
    (in a process of its own: both protos define the package `inference`)."""
    import json
    import subprocess
    import sys

    from sealbox.daemon.server import model_config
    from sealbox.proto import inference_pb2 as pb
    from sealbox.proto.contract import Batching
    metadata = pb.ModelMetadataResponse(name="m", platform="mlx")
    metadata.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    metadata.outputs.add(name="y", datatype="FP32", shape=[-1, 3])
    read = ("import json, sys\n"
            "from tritonclient.grpc import model_config_pb2 as t\n"
            "c = t.ModelConfig.FromString(bytes.fromhex(sys.argv[1]))\n"
            "print(json.dumps([c.max_batch_size, list(c.dynamic_batching.preferred_batch_size),\n"
            "    c.dynamic_batching.max_queue_delay_microseconds, c.dynamic_batching.preserve_ordering,\n"
            "    c.HasField('dynamic_batching'), [(i.name, list(i.dims), t.DataType.Name(i.data_type)) for i in c.input],\n"
            "    [(o.name, list(o.dims)) for o in c.output]]))\n")

    def theirs(config) -> list:
        out = subprocess.run([sys.executable, "-c", read, config.SerializeToString().hex()],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)
    assert theirs(model_config(metadata, Batching(32, 500, (16, 32)))) == [
        32, [16, 32], 500, True, True, [["x", [4], "TYPE_FP32"]], [["y", [3]]]]
    assert theirs(model_config(metadata)) == [0, [], 0, False, False, [["x", [-1, 4], "TYPE_FP32"]], [["y", [-1, 3]]]]


def test_warm_pool_and_early_start_keys(tmp_path):
    cfg = load_config(config(tmp_path))
    assert (cfg.workers.warm_pool, cfg.workers.early_start) == (0, True)
    cfg = load_config(config(tmp_path, "warm_pool = 2\nearly_start = false"))
    assert (cfg.workers.warm_pool, cfg.workers.early_start) == (2, False)
    with pytest.raises(ConfigError, match=r"\[workers\]: key 'early_start' must be bool, not int"):
        load_config(config(tmp_path, "early_start = 0"))
    with pytest.raises(ConfigError, match=r"\[workers\]: key 'warm_pool' must be 0 \(off\) to 16, not 17"):
        load_config(config(tmp_path, "warm_pool = 17"))
