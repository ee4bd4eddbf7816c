"""One sandboxed worker process as the supervisor sees it: spawning, the hop to it, its death.

The supervisor (daemon/supervisor.py) decides *when* a worker runs; this
module knows *how* to talk to one and how to explain its end.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import shutil
import signal
import threading
import time

from ..proto.contract import EXIT_REASONS, SOCKET_NAME, STDERR_PREFIX
from ..proto.hop import ProtocolError
from ..sandbox import launcher
from ..sandbox.profile import SandboxProfile
from .worker_hop import WorkerHop, describe
from .errors import MAX_DESCRIBE_BYTES

log = logging.getLogger("sealboxd")


class ModelUnavailable(Exception):
    """The model cannot answer now (loading, crashed, unloaded): gRPC UNAVAILABLE."""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int) -> str:
    """bwrap exits 128+N when the worker died of signal N."""
    if returncode > 128:
        text = f"killed by {_signal_name(returncode - 128)}"
        if returncode - 128 == signal.SIGSYS:
            text += " (seccomp violation)"
        return text
    if returncode < 0:
        return f"killed by {_signal_name(-returncode)}"
    return f"exited with code {returncode}" + (f" ({EXIT_REASONS[returncode]})" if returncode in EXIT_REASONS else "")


class Spawner:
    """Starts every worker from one long-lived thread.

    bwrap's --die-with-parent (PR_SET_PDEATHSIG) fires when the *thread* that
    forked it exits, so workers must not be forked from short-lived threads.
    """

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="spawner", daemon=True).start()

    def _run(self):
        while True:
            fn, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed back to the caller
                    future.set_exception(exc)

    def call(self, fn):
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future.result()


class WorkerProcess:
    """One running sandboxed worker process and the hop to it."""

    def __init__(self, name: str, profile: SandboxProfile, socket_dir: str, sandboxed: launcher.SandboxedWorker,
                 max_message_bytes: int):
        self.name, self.profile, self.socket_dir = name, profile, socket_dir
        self.sandboxed, self.proc = sandboxed, sandboxed.proc
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.stopping = False
        self.ready_at: float | None = None
        self.slot = 0   # which of its model's instances it is (config `instances`)
        self.path = "spawn"   # how it got its model: "spawn" (started for it) or "pool" (a warm-pool worker)
        self.phases: dict[str, float] = {}   # where its load's time went (the model_load audit event)
        self.on_execution = None   # set by the supervisor for a batching model: f(rows, ns)
        self.inflight = 0   # inference calls on its hop (event loop only); a replaced worker drains them
        self.max_message_bytes = max_message_bytes
        self.provenance = None   # set by the supervisor: the verified model it was started from
        self.stamp = b""         # that provenance as response parameters (daemon/provenance.py)
        # Describe (at load) is a blocking exchange of its own (worker_hop.describe); inference goes
        # over the event loop's hop (worker_hop.WorkerHop), as many calls at once as the server's
        # admission.ModelGate admits.
        self._hop = None
        self._hop_lock = threading.Lock()
        self._killed = False
        self._stderr_reader = threading.Thread(target=self._drain_stderr, name=f"stderr-{name}", daemon=True)
        self._stderr_reader.start()

    def _drain_stderr(self):
        # Bounded reads: a hostile worker writing without newlines must not grow the supervisor.
        for line in iter(lambda: self.proc.stderr.readline(4096), b""):
            text = line.decode("utf-8", "replace").rstrip()
            self.stderr_tail.append(text)
            log.debug("worker %s: %s", self.name, text)

    @property
    def socket_path(self) -> str:
        return os.path.join(self.socket_dir, SOCKET_NAME)

    def hop(self):
        """The inference hop on the running event loop (made by the first call); None once stopping."""
        with self._hop_lock:
            if self.stopping:
                return None
            if self._hop is None:
                self._hop = WorkerHop(self.socket_path, self.max_message_bytes)
                self._hop.on_execution = self.on_execution
                self._hop.on_broken = self._hop_broken
            return self._hop

    def _hop_broken(self, reason: str) -> None:
        """On the event loop: kill on a thread (the kill waits for the worker's group to empty)."""
        if not self.stopping and self.proc.poll() is None:
            log.warning("worker %s: %s; killing it", self.name, reason)
            # its watcher reports the death and restarts it with backoff
            threading.Thread(target=self.sandboxed.kill, daemon=True, name=f"kill-{self.name}").start()

    def wait_ready(self, timeout: float) -> bytes:
        """The worker's serialized ModelMetadataResponse once it answers; ModelUnavailable if it
        dies, does not answer in time, or answers with more than MAX_DESCRIBE_BYTES."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ModelUnavailable(self.death_reason("while loading"))
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ModelUnavailable(f"load timed out after {timeout:g} s; worker killed")
            try:
                return describe(self.socket_path, MAX_DESCRIBE_BYTES, left)
            except ProtocolError:
                self.kill()
                raise ModelUnavailable(f"the worker's metadata answer is malformed or larger than "
                                       f"{MAX_DESCRIBE_BYTES} bytes; worker killed") from None
            except OSError:   # not listening yet (or it just died: polled above); TimeoutError: the deadline
                time.sleep(0.005)

    def death_reason(self, when: str) -> str:
        rc = self.proc.wait()
        self._stderr_reader.join(timeout=1.0)  # the worker's last words, before they are quoted
        limit = f"memory limit {self.profile.memory_bytes // 2**20} MiB"
        if self.sandboxed.oom_killed():
            reason = f"worker killed by the OOM killer {when} ({limit})"
        else:
            reason = f"worker {describe_exit(rc)} {when}"  # memory is blamed only on the cgroup's word
        if self.sandboxed.pids_limit_hit():
            reason += f" (process limit {self.profile.pids_max} reached)"
        last = [line for line in self.stderr_tail if line.startswith(STDERR_PREFIX)]
        if last and self.ready_at is None:  # while loading: what it was parsing, or why it refused
            reason += ": " + last[-1].removeprefix(STDERR_PREFIX)
        return reason

    def kill(self):
        """Stop the worker and close its hop; idempotent (a drain and a shutdown may race)."""
        with self._hop_lock:
            if self._killed:
                return
            self._killed = self.stopping = True
            hop, self._hop = self._hop, None
        if hop is not None:
            hop.close_soon()
        self.sandboxed.stop()
        shutil.rmtree(self.socket_dir, ignore_errors=True)
