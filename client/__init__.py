"""Python client for sealbox (Open Inference Protocol) and the `sealbox` CLI."""
from .client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
