"""Operational logging for sealboxd: ISO-8601 UTC timestamps, a level, text or JSON.

Operational lines (what the daemon is doing) go through the standard logging
module to stderr (the journal, under systemd) and optionally to a file. Audit
events (daemon/audit.py) never go here: they have their own file, so the two
streams are never interleaved and each can be shipped and kept on its own terms.

    text:  2025-01-31T12:00:00.123Z INFO sealboxd: listening on unix:/run/sealbox/sealbox.sock
    json:  {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "sealboxd", "message": "..."}

The JSON formatter is python-json-logger's; anything passed as `extra=` lands
as its own key. `reopen()` reopens the log file (logrotate's convention: the
rotator renames the file, then sends SIGHUP).
"""
from __future__ import annotations

import datetime
import logging
import logging.handlers
import os
import sys

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JSON = "%(asctime)s %(levelname)s %(name)s %(message)s"


def iso_time(created: float) -> str:
    """ISO-8601 UTC with milliseconds: 2025-01-31T12:00:00.123Z (the audit log uses the same)."""
    stamp = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__(_TEXT)

    def formatTime(self, record, datefmt=None):  # noqa: N802 (logging's name)
        return iso_time(record.created)


class JsonLineFormatter(JsonFormatter):
    def __init__(self):
        super().__init__(_JSON, rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})

    def formatTime(self, record, datefmt=None):  # noqa: N802
        return iso_time(record.created)


class ReopenableFileHandler(logging.handlers.WatchedFileHandler):
    """A log file that follows renames by itself and can be reopened on demand (SIGHUP)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream:
                self.stream.flush()
                self.stream.close()
            self.stream = self._open()
            self._statstream()
        finally:
            self.release()

    def _open(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.baseFilename)), mode=0o750, exist_ok=True)
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return JsonLineFormatter() if fmt == "json" else TextFormatter()


def setup(fmt: str = "text", level: int = logging.INFO, stream=None, file: str | None = None,
          logger: logging.Logger | None = None) -> list[logging.Handler]:
    """Replace the handlers of `logger` (the root logger by default) with stderr and optionally a file."""
    target = logger if logger is not None else logging.getLogger()
    for handler in list(target.handlers):
        target.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr if stream is None else stream)]
    if file:
        handlers.append(ReopenableFileHandler(file, encoding="utf-8", delay=False))
    chosen = formatter(fmt)
    for handler in handlers:
        handler.setFormatter(chosen)
        target.addHandler(handler)
    target.setLevel(level)
    return handlers


def reopen(logger: logging.Logger | None = None) -> int:
    """Reopen every reopenable file handler of `logger` (root by default); returns how many."""
    target = logger if logger is not None else logging.getLogger()
    count = 0
    for handler in target.handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()
            count += 1
    return count
