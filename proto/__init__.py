"""Every contract between sealbox's processes, in one package.

| module | what it holds |
|---|---|
| inference.proto, inference_pb2*.py | the public Open Inference Protocol (KServe v2 / Triton; ModelConfig and ModelStatistics in Triton's shape), generated stubs |
| hop.py | the supervisor <-> worker hop: the record format (header, kinds, flags), memfd bodies, bounded send/recv helpers (no grpc, no numpy) |
| generate.py | regenerates the stubs (the tests check they are current) |
| wire.py | hand-written protobuf wire helpers: varints, routing-field peek, the completeness check and provenance (string) and triton_final_response (bool) parameters of a worker's response, stream framing |
| tensors.py | tensors <-> numpy arrays, raw contents appended by hand (as buffers: `response_parts`); BYTES (length-prefixed) and BF16 (ml_dtypes.bfloat16) |
| contract.py | the worker contract: WorkerSpec, exit codes, engine names, memfd seals |
"""
from .wire import message_options

__all__ = ["message_options"]
