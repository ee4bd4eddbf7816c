"""The user's side of sealbox: the Python client, the `sealbox` CLI, publishing and the demo.

| module | what it holds |
|---|---|
| client.py | `Client` and `AsyncClient`: numpy in, numpy out, over the Open Inference Protocol (inference and admin targets) |
| cli.py | the `sealbox` command line: call a daemon, publish models, inspect the sandbox |
| publisher.py | `sealbox hash`, `sealbox sign`, `sealbox verify`: the publisher's commands over sealbox.trust |
| transfer_cli.py | `sealbox fetch` (a signed model over HTTPS, from OCI or over SFTP into a directory) and `sealbox store ls`/`gc` |
| demo.py | `sealbox demo`: build, sign and serve the demo model, call it once |
| demo_model.py | the built-in demo model (an exported MLX function and its weights) |
"""
__all__ = ["AsyncClient", "Client", "StreamError"]


def __getattr__(name: str):
    # Imported on first use: the publisher's commands (`sealbox verify`) need no grpc or numpy.
    if name in __all__:
        from . import client
        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
