"""The load phases a model_load event carries: the worker's own numbers are taken only when plausible."""
from __future__ import annotations

import math

from sealbox.daemon.phases import LoadPhases, worker_reported
from sealbox.proto import inference_pb2 as pb


def answer(**params) -> bytes:
    response = pb.ModelMetadataResponse(name="m", platform="mlx")
    for key, (kind, value) in params.items():
        setattr(response.parameters[key], kind, value)
    return response.SerializeToString()


def test_the_workers_numbers_are_copied_when_plausible():
    got = worker_reported(answer(deserialize_s=("double_param", 0.25), warmup_s=("string_param", "0.125"),
                                 load_s=("int64_param", 2), other=("double_param", 9.0)))
    assert got == {"deserialize_s": 0.25, "warmup_s": 0.125, "load_s": 2.0}


def test_implausible_numbers_are_dropped():
    for kind, value in [("double_param", -1.0), ("double_param", math.nan), ("double_param", math.inf),
                        ("double_param", 1e9), ("string_param", "soon"), ("string_param", "nan"),
                        ("bool_param", True)]:
        assert worker_reported(answer(load_s=(kind, value))) == {}, (kind, value)
    assert worker_reported(b"\xff\xff not protobuf") == {}
    assert worker_reported(answer()) == {}


def test_fields_and_log_text():
    phases = LoadPhases()
    phases.started -= 3.0          # as if the load began 3 s ago
    phases.verify_s, phases.hash_s, phases.spawn_started = 1.0, 0.75, phases.started + 1.0
    phases.answered(answer(load_s=("double_param", 1.5)))
    fields = phases.fields(phases.started + 3.0)
    assert fields == {"ready_s": 3.0, "verify_s": 1.0, "hash_s": 0.75, "spawn_s": fields["spawn_s"], "worker_load_s": 1.5}
    assert 1.9 < fields["spawn_s"] < 2.5
    assert LoadPhases.describe(fields) == (f"ready in 3.000 s (verify 1.000 s, of which hashing 0.750 s; "
                                           f"spawn {fields['spawn_s']:.3f} s; worker: load 1.500 s)")
    restart = LoadPhases()
    assert LoadPhases.describe(restart.fields(restart.started + 0.5)) == "ready in 0.500 s"
