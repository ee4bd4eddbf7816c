"""Flux.jl models saved with BSON.jl: strict reader, allowlist scanner, native evaluator."""
