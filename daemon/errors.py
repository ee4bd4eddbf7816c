"""Every status a client sees is made here: fixed codes, fixed or truncated texts.

Rules (from the issue):
* a worker's death, a connect failure, a closed connection, a hop timeout -> UNAVAILABLE with the
  MODEL'S reason (the supervisor's own words), never the transport's text (an OSError's text
  contains a path), a path or a pid;
* a worker's own status codes (the hop's ERROR records) are mapped onto a small fixed set and its
  message (model-authored text) is truncated and stripped of control characters;
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


# Codes a worker may legitimately answer with (in its hop ERROR record); its (truncated) message is passed on.
_PASS_THROUGH = {
    SC.INVALID_ARGUMENT: SC.INVALID_ARGUMENT,
    SC.OUT_OF_RANGE: SC.INVALID_ARGUMENT,
    SC.FAILED_PRECONDITION: SC.FAILED_PRECONDITION,
    SC.UNIMPLEMENTED: SC.UNIMPLEMENTED,
    SC.NOT_FOUND: SC.INVALID_ARGUMENT,   # e.g. "no input named x": the MODEL exists, the tensor does not
}


def unavailable(model: str, reason: str) -> ClientError:
    """The one way to say a model cannot answer. `reason` is the supervisor's text
    (e.g. "worker killed by SIGKILL", "restarting in 2 s", "not loaded")."""
    return ClientError(SC.UNAVAILABLE, f"model '{model}' is unavailable: {clean(reason)}")


def from_worker_status(model: str, code: grpc.StatusCode, details: str) -> ClientError:
    """Map the status of a worker's ERROR record (worker_hop.WorkerStatus). The hop's own failures
    (the worker died, a timeout, a broken record) never come here: the supervisor says UNAVAILABLE
    with the model's reason."""
    if code == SC.RESOURCE_EXHAUSTED:   # no worker text needed
        return ClientError(SC.RESOURCE_EXHAUSTED, f"model '{model}': response exceeds the message limit")
    if code in _PASS_THROUGH:
        return ClientError(_PASS_THROUGH[code], clean(details))   # the model's own words, bounded
    # INTERNAL (the engine failed), and PERMISSION_DENIED, UNAVAILABLE, ...: a worker has no business
    # there. A fixed text: the engine's own words about a failure may quote anything it holds.
    return model_failed(model)


def model_failed(model: str) -> ClientError:
    """The one way to say a model's worker failed a call or broke its word (an answer that fails the
    supervisor's checks): INTERNAL with a fixed text, nothing of what the worker said."""
    return ClientError(SC.INTERNAL, f"model '{model}' failed")


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
