"""sd_notify: tell systemd (Type=notify) that the daemon is ready, reloading or stopping.

The protocol is one datagram of newline-separated KEY=VALUE lines sent to the
AF_UNIX socket named by $NOTIFY_SOCKET (a leading '@' names an abstract
socket). Without $NOTIFY_SOCKET every call is a no-op, so the daemon behaves
the same outside systemd. The variables are removed from the environment once
read, so nothing the daemon starts inherits them.

    READY=1       every `load = true` model has an outcome (READY or a reason)
    RELOADING=1   SIGHUP received (with MONOTONIC_USEC, as systemd >= 253 asks)
    STOPPING=1    shutdown has begun
    WATCHDOG=1    the daemon still answers its own health check (WatchdogSec=)
    STATUS=...    one line shown by `systemctl status`
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("sealboxd")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._lock = threading.Lock()

    @classmethod
    def from_environ(cls, environ=None, unset: bool = True) -> "Notifier":
        """Read $NOTIFY_SOCKET and $WATCHDOG_USEC (honoured only if $WATCHDOG_PID is unset or ours)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram; False (and a debug line) if there is no socket or it fails."""
        if not self.address:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        elif not target.startswith("/"):
            log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract name: not notifying", self.address)
            return False
        data = "\n".join(lines).encode()
        try:
            with self._lock, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, target)
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WatchdogSec=, as sd_watchdog_enabled(3) advises."""
        return None if not self.watchdog_usec else self.watchdog_usec / 2e6

    def start_watchdog(self, stop: threading.Event, healthy: Callable[[], bool]) -> threading.Thread | None:
        """Ping WATCHDOG=1 every interval while healthy() says so; a hung daemon stops pinging
        and systemd restarts it. Returns the thread, or None if no watchdog was asked for."""
        interval = self.watchdog_interval()
        if not self.enabled or interval is None:
            return None

        def run():
            while not stop.wait(interval):
                try:
                    ok = healthy()
                except Exception as exc:  # a broken check must look like a hang, not kill the thread
                    log.warning("watchdog health check failed: %s", exc)
                    ok = False
                if ok:
                    self.send("WATCHDOG=1")
                else:
                    log.warning("watchdog: health check failed; not pinging systemd")
        thread = threading.Thread(target=run, name="watchdog", daemon=True)
        thread.start()
        return thread
