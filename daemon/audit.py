"""The audit log: one JSON line per decision, in its own file.

Events carry names, paths, digests, identities, verdicts and reasons; never
key material or tensor data (callers pass only such fields).

Each line is {"time": ISO-8601 UTC with milliseconds, "event": NAME, ...}.
Event names have one style, `subject_verb` in snake_case (model_verify,
model_load, worker_died); a dotted name from a caller is written with
underscores. The file is never shared with operational log lines; `reopen()`
starts writing to the path again after logrotate renamed the file (SIGHUP).
The daemon never sets `to_stderr` (kept for library callers only).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import threading
from typing import Any


def audit_time() -> str:
    """Now, as ISO-8601 UTC with milliseconds: 2025-01-31T12:00:00.123Z."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_name(name: str) -> str:
    """The one naming style: model.verify -> model_verify."""
    return name.replace(".", "_").replace("-", "_")


class AuditLog:
    def __init__(self, path: str | None = None, to_stderr: bool = False):
        self._lock = threading.Lock()
        self._stderr = to_stderr
        self._file = None
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o750, exist_ok=True)
            self._file = self._open(path)

    @staticmethod
    def _open(path: str):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", buffering=1)

    def event(self, event: str, **fields: Any) -> dict:
        record = {"time": audit_time(), "event": event_name(event), **fields}
        line = json.dumps(record, sort_keys=False, default=str)
        with self._lock:
            if self._file:
                self._file.write(line + "\n")
            if self._stderr:
                print(line, file=sys.stderr, flush=True)
        return record

    def reopen(self) -> None:
        """Open the path afresh (logrotate renamed the old file); events after this land in the new file."""
        if not self.path:
            return
        new = self._open(self.path)  # outside the lock: a failure leaves the old file in use
        with self._lock:
            old, self._file = self._file, new
        if old:
            old.close()

    def close(self) -> None:
        with self._lock:
            if self._file:
                self._file.close()
                self._file = None
