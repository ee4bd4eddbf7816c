"""The code that runs inside a worker sandbox: the only code that parses a model.

| module | what it holds |
|---|---|
| main.py | the worker process: reads its WorkerSpec, confines itself, loads (or, from the warm pool, waits for its model's LOAD first), serves |
| serving.py | the worker's side of the hop (proto/hop.py): reader threads, calls in order on the engine thread, CANCEL, streamed responses, dynamic batching |
| batching.py | dynamic batching: which requests may share an engine call, joining and splitting their rows |
| engine.py | the engine interface (`Engine`, `TensorSpec`, errors) and the engine registry |
| mlx_engine.py | MLX models: an exported function (.mlxfn) or a built-in MLP over weights |
| llm_engine.py | language models in the mlx-lm layout (format = "mlx-lm", the `[llm]` extra): config and remote-code checks, strict weights, mlx_lm.load from symlinks to the sealed memfds, vLLM-backend tensors, streaming |
| flux/ | Flux.jl models saved with BSON.jl: strict reader, allowlist scanner, evaluators |

The worker imports only the wire protocol and contract (sealbox.proto) and the
sandbox layers it applies to itself (sealbox.sandbox); it imports no gRPC.
"""
