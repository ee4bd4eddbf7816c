"""Python client for sealbox (Open Inference Protocol) and the `sealbox` CLI."""
from sealbox.client.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
