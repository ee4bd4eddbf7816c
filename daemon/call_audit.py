"""Audit events of calls: the caller's transport-proven identity on every event, refusals rate-limited.

`CallAudit` wraps the daemon's AuditLog (audit.py) and is handed to the supervisor in its place:
every event written while a call is being handled (a load, an unload, the verification verdicts of
a load, an inference timeout) carries the caller's fields (listener, transport, and on TCP the
peer, on mutual TLS the certificate subject and SANs), read from the `current_caller` context
variable that the listener's access check sets (listeners.py). Events outside a call (a worker's
death, the initial loads) carry none.

A flood of refused calls must not fill the disk: per key (listener, certificate subject, method)
the first `burst` refusals of every `window_s` are written in full; the rest are only counted and
written as one `denied_suppressed` event per key when its window ends (checked on the next refusal
and by flush(), which the server calls every few seconds). The number of keys is capped; beyond it
refusals are counted under one overflow key. denied() and flush() run on the event loop only.
"""
from __future__ import annotations

import contextvars
import time
from typing import Any

from .roles import Caller

current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("sealbox_caller", default=None)


class CallAudit:
    def __init__(self, log, burst: int = 5, window_s: float = 10.0, max_keys: int = 1024):
        self.log = log                      # an audit.AuditLog: event(kind, **fields), close()
        self.burst, self.window_s, self.max_keys = burst, window_s, max_keys
        self._denials: dict[tuple, list] = {}   # key -> [window_start, written, suppressed]

    def event(self, kind: str, **fields: Any) -> dict:
        caller = current_caller.get()
        if caller is not None:
            fields = {**caller.audit_fields(), **fields}
        return self.log.event(kind, **fields)

    def close(self) -> None:
        self.flush(force=True)
        self.log.close()

    def denied(self, caller: Caller, method: str, role: str | None) -> None:
        key = (caller.listener, caller.subject, method)
        if key not in self._denials and len(self._denials) >= self.max_keys:
            key = ("*overflow*", None, "*")
        now = time.monotonic()
        slot = self._denials.get(key)
        if slot is None or now - slot[0] >= self.window_s:
            if slot is not None and slot[2]:
                self._summary(key, slot)
            slot = self._denials[key] = [now, 0, 0]
        if slot[1] < self.burst:
            slot[1] += 1
            self.log.event("call_denied", **caller.audit_fields(), method=method, role=role)
        else:
            slot[2] += 1

    def _summary(self, key, slot) -> None:
        listener, subject, method = key
        fields = {"listener": listener, "method": method, "count": slot[2], "window_s": self.window_s}
        if subject:
            fields["cert_subject"] = subject
        self.log.event("denied_suppressed", **fields)

    def flush(self, force: bool = False) -> None:
        """Write summaries of ended windows (all windows if force) and forget them (bounded memory)."""
        now = time.monotonic()
        for key, slot in list(self._denials.items()):
            if force or now - slot[0] >= self.window_s:
                if slot[2]:
                    self._summary(key, slot)
                del self._denials[key]
