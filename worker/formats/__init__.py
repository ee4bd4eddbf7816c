"""Strict readers for the model file formats the MLX engine hands to MLX.

MLX's own parsers trust their input: a signature says who published a file,
not that it is well formed. Each reader here is pure Python, checks one
format's layout completely and with bounded work (sizes and counts are
checked before anything is allocated for them), and raises ModelError naming
the file and the defect, before MLX ever sees the bytes.

| module         | holds                                                                 |
|----------------|-----------------------------------------------------------------------|
| `safetensors`  | the safetensors header reader, and the cross-check of what MLX loaded |
| `gguf`         | the GGUF (v2/v3) header, metadata and tensor-info reader              |
| `mlxfn`        | the `.mlxfn` (mx.export_function) file reader: version, size, graph   |
| `scan_cli`     | `sealbox scan` of a safetensors, GGUF or .mlxfn file, in the sandbox  |
"""
