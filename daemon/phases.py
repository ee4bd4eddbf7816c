"""Where a load's time goes: the phase durations recorded in its `model_load` audit event and log line.

The supervisor marks each phase as it passes it (one LoadPhases per load or
restart); the worker's own durations, when its Describe answer carries them
(ModelMetadataResponse.parameters `deserialize_s`, of which `read_s` reading the
tensors, `warmup_s`, `load_s`), are
copied in as the worker reported them: plausibility-checked numbers for the
operator, never used for a decision (a compromised worker can say anything).
"""
from __future__ import annotations

import math
import time

from ..proto import inference_pb2 as pb

WORKER_PHASES = ("deserialize_s", "read_s", "warmup_s", "load_s")
MAX_REPORTED_S = 86400.0   # a worker's number beyond a day is not a duration: dropped


class LoadPhases:
    """Monotonic marks of one load: verify (of which hashing and sealing), spawn until the
    worker's socket answers, and the total until READY."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.verify_s: float | None = None   # None: a restart from the same sealed copies
        self.hash_s: float | None = None
        self.spawn_started: float | None = None
        self.spawn_s: float | None = None
        self.worker: dict[str, float] = {}

    def verified(self, hash_s: float) -> None:
        self.verify_s = time.monotonic() - self.started
        self.hash_s = hash_s

    def spawning(self) -> None:
        self.spawn_started = time.monotonic()

    def answered(self, describe_answer: bytes) -> None:
        """The worker's socket answered Describe: spawn ends; keep what it says about its load."""
        if self.spawn_started is not None:
            self.spawn_s = time.monotonic() - self.spawn_started
        self.worker = worker_reported(describe_answer)

    def fields(self, ready_at: float) -> dict[str, float]:
        """The audit event's fields, seconds rounded to the 0.1 ms: what was measured, nothing else."""
        out = {"ready_s": ready_at - self.started}
        for key in ("verify_s", "hash_s", "spawn_s"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update({f"worker_{k}": v for k, v in self.worker.items()})
        return {k: round(v, 4) for k, v in out.items()}

    @staticmethod
    def describe(fields: dict[str, float]) -> str:
        """The log line's part: 'ready in 1.234 s (verify 0.612 s, of which hashing 0.400 s; spawn 0.620 s)'."""
        parts = []
        if "verify_s" in fields:
            parts.append(f"verify {fields['verify_s']:.3f} s, of which hashing {fields['hash_s']:.3f} s")
        if "spawn_s" in fields:
            parts.append(f"spawn {fields['spawn_s']:.3f} s")
        worker = [f"{k.removeprefix('worker_').removesuffix('_s')} {v:.3f} s" for k, v in fields.items()
                  if k.startswith("worker_")]
        if worker:
            parts.append("worker: " + ", ".join(worker))
        return f"ready in {fields['ready_s']:.3f} s" + (f" ({'; '.join(parts)})" if parts else "")


def worker_reported(describe_answer: bytes) -> dict[str, float]:
    """deserialize_s, read_s, warmup_s, load_s from a worker's ModelMetadataResponse, where present as
    finite non-negative numbers (double, int64, uint64 or a decimal string); anything else dropped."""
    from google.protobuf.message import DecodeError
    try:
        params = pb.ModelMetadataResponse.FromString(describe_answer).parameters
    except DecodeError:
        return {}   # the caller refuses a malformed answer itself
    found = {}
    for key in WORKER_PHASES:
        if key not in params:
            continue
        p = params[key]
        kind = p.WhichOneof("parameter_choice")
        try:
            value = float(getattr(p, kind)) if kind in ("double_param", "int64_param", "uint64_param", "string_param") else None
        except ValueError:
            value = None
        if value is not None and math.isfinite(value) and 0.0 <= value <= MAX_REPORTED_S:
            found[key] = value
    return found
