"""The code that runs inside a worker sandbox: the worker server and its engines."""
