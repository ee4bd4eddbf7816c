"""sealbox: a sandboxed model-loading daemon."""
__version__ = "0.1.0"
