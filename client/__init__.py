"""Python client for sealbox (Open Inference Protocol) and the `sealbox` CLI."""
