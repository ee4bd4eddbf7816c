"""Every status a client sees is made here: fixed codes, fixed or truncated texts.

Rules (from the issue):
* a worker's death, a connect failure, a closed channel, a hop timeout -> UNAVAILABLE with the
  MODEL'S reason (the supervisor's own words), never the transport's text (grpc's
  "failed to connect to all addresses; last error: ... unix:/run/sealbox/workers/x/...:
  Connection refused" contains a path), a path or a pid;
* a worker's own status codes are mapped onto a small fixed set and its message (model-authored
  text) is truncated and stripped of control characters;
* Describe answers are bounded in size (MAX_DESCRIBE_BYTES) and kept once per load (the supervisor).
"""
from __future__ import annotations

import re

import grpc

MAX_DETAIL = 200            # characters of a worker's message that may reach the client
MAX_DESCRIBE_BYTES = 64 * 1024

SC = grpc.StatusCode


class ClientError(Exception):
    """Raised anywhere in a handler; the handler's wrapper turns it into context.abort(code, message)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.+-]+/)*[\w.+-]+")


def clean(text: str | None, limit: int = MAX_DETAIL) -> str:
    """Printable, single-line, at most `limit` characters, absolute paths replaced by "<path>"."""
    text = "".join(c if c.isprintable() else " " for c in (text or "")[:4 * limit])
    text = _ABS_PATH.sub("<path>", text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


# Codes a worker may legitimately answer with; its (truncated) message is passed on.
_PASS_THROUGH = {
    SC.INVALID_ARGUMENT: SC.INVALID_ARGUMENT,
    SC.OUT_OF_RANGE: SC.INVALID_ARGUMENT,
    SC.FAILED_PRECONDITION: SC.FAILED_PRECONDITION,
    SC.UNIMPLEMENTED: SC.UNIMPLEMENTED,
    SC.NOT_FOUND: SC.INVALID_ARGUMENT,   # e.g. "no input named x": the MODEL exists, the tensor does not
}
# Codes that gRPC itself produces on the hop (or that only a broken worker would claim):
# the text is never passed on.
TRANSPORT_CODES = {SC.UNAVAILABLE, SC.CANCELLED, SC.UNKNOWN, SC.INTERNAL, SC.DATA_LOSS, SC.ABORTED}


def unavailable(model: str, reason: str) -> ClientError:
    """The one way to say a model cannot answer. `reason` is the supervisor's text
    (e.g. "worker killed by SIGKILL", "restarting in 2 s", "not loaded")."""
    return ClientError(SC.UNAVAILABLE, f"model '{model}' is unavailable: {clean(reason)}")


def from_worker_rpc_error(model: str, exc: grpc.RpcError, reason_if_dead: str | None,
                          infer_timeout_s: float) -> ClientError:
    """Map a grpc.aio.AioRpcError (or sync grpc.RpcError) from the worker hop.

    reason_if_dead: the supervisor's reason when the worker process is gone (poll() is not None),
    else None.  A hop DEADLINE_EXCEEDED means the supervisor kills the worker (as today).
    """
    code = exc.code()
    if reason_if_dead is not None or code in TRANSPORT_CODES:
        return unavailable(model, reason_if_dead or "worker connection failed")
    if code == SC.DEADLINE_EXCEEDED:
        return unavailable(model, f"inference timed out after {infer_timeout_s:g} s; worker restarted")
    if code == SC.RESOURCE_EXHAUSTED:  # grpc's "message larger than max": no worker text needed
        return ClientError(SC.RESOURCE_EXHAUSTED, f"model '{model}': response exceeds the message limit")
    if code in _PASS_THROUGH:
        return ClientError(_PASS_THROUGH[code], clean(exc.details()))   # the model's own words, bounded
    # PERMISSION_DENIED, UNAUTHENTICATED, ALREADY_EXISTS, OK-with-error...: a worker has no business there
    return ClientError(SC.INTERNAL, f"model '{model}' failed")


def from_transport_exception(model: str, exc: BaseException) -> ClientError:
    """OSError, ValueError("Cannot invoke RPC on closed channel!"), asyncio.TimeoutError, ...
    raised by the hop itself: fixed text, the exception's str() is never shown."""
    return unavailable(model, "worker connection failed")


# Fixed texts for the front door's own refusals ----------------------------------------------------
def denied(method: str, role: str | None) -> ClientError:
    what = f"role '{role}'" if role else "an unknown method"
    return ClientError(SC.PERMISSION_DENIED, f"{what} is not permitted to this caller on this listener")


def exhausted(what: str) -> ClientError:
    return ClientError(SC.RESOURCE_EXHAUSTED, f"sealbox is at its limit of {what}; retry later")


def malformed() -> ClientError:
    return ClientError(SC.INVALID_ARGUMENT, "malformed ModelInferRequest")


def unknown_model(name: str) -> ClientError:
    return ClientError(SC.NOT_FOUND, f"unknown model '{clean(name, 64)}'")


def no_version(name: str, asked: str, loaded: str) -> ClientError:
    return ClientError(SC.NOT_FOUND, f"model '{name}' has no version '{clean(asked, 64)}' (loaded: '{loaded}')")
