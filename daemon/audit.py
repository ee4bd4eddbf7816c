"""The audit log: one JSON line per decision, to a file and/or stderr.

Events carry names, paths, digests, identities, verdicts and reasons; never
key material or tensor data (callers pass only such fields).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any


class AuditLog:
    def __init__(self, path: str | None = None, to_stderr: bool = False):
        self._lock = threading.Lock()
        self._stderr = to_stderr
        self._file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o750, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._file = os.fdopen(fd, "a", buffering=1)

    def event(self, event: str, **fields: Any) -> dict:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
        line = json.dumps(record, sort_keys=False, default=str)
        with self._lock:
            if self._file:
                self._file.write(line + "\n")
            if self._stderr:
                print(line, file=sys.stderr, flush=True)
        return record

    def close(self) -> None:
        with self._lock:
            if self._file:
                self._file.close()
                self._file = None
