"""The warm pool ([workers] warm_pool = K): K sandboxed workers per worker profile, started before
their model is known and confined as far as they can be without it, each waiting on its socket for
one LOAD record (proto/hop.py) with its model's sealed memfds and handoff.

Before the model (at spawn, as every worker): namespaces, the worker uid, no network, rlimits, the
engine's first seccomp stage, its cgroup (with the [workers] limits), Landlock's view (the runtime,
no model path: the model arrives as fds), the interpreter, OpenBLAS and the engine (MLX) imported.
After the fds arrive and before any model byte is parsed: the model's memory and pids limits on the
cgroup (written by `hand` before the LOAD is sent) and the engine's second seccomp stage (applied by
the worker on receipt). SECURITY.md, "Warm pool", has the measurement.

A pool worker serves exactly one model, ever: `take` removes it from the pool for good, it is never
given back (it dies with its model's unload or replacement), and the pool refills in the background.
An idle pool worker that dies is replaced.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Callable, Iterable, Mapping

from ..proto import hop
from ..proto.contract import ModelHandoff
from ..sandbox.profile import SandboxProfile
from .worker_process import ModelUnavailable, WorkerProcess, describe_exit

log = logging.getLogger("sealboxd")


def pool_key(profile: SandboxProfile) -> SandboxProfile:
    """What a pool worker must share with a model's profile: everything fixed at spawn. The model's
    limits and batching arrive with it; its timeouts are the supervisor's."""
    return dataclasses.replace(profile, memory_bytes=0, pids_max=0, batching=None, max_message_bytes=0,
                               load_timeout_s=0.0, infer_timeout_s=0.0)


class WarmPool:
    def __init__(self, size: int, spawn: Callable[[SandboxProfile], WorkerProcess], audit):
        self.size, self._spawn, self.audit = size, spawn, audit
        self._profiles: dict[SandboxProfile, SandboxProfile] = {}   # key -> the profile pool workers get
        self._idle: dict[SandboxProfile, list[WorkerProcess]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        threading.Thread(target=self._refill, name="warm-pool", daemon=True).start()

    def configure(self, profiles: Iterable[SandboxProfile], memory_bytes: int, pids_max: int) -> None:
        """Keep K workers for each of these (models') profiles, spawned with the [workers] limits;
        idle workers of profiles no longer needed are stopped."""
        wanted = {pool_key(p): dataclasses.replace(p, memory_bytes=memory_bytes, pids_max=pids_max, batching=None)
                  for p in profiles}
        with self._lock:
            self._profiles = wanted
            gone = [w for key, idle in self._idle.items() if key not in wanted for w in idle]
            self._idle = {key: self._idle.get(key, []) for key in wanted}
        for worker in gone:
            worker.kill()
        self._wake.set()

    def take(self, profile: SandboxProfile) -> WorkerProcess | None:
        """An idle worker for this profile (one already listening first), removed from the pool for
        good; None when there is none (the caller spawns)."""
        with self._lock:
            idle = self._idle.get(pool_key(profile), [])
            live = [w for w in idle if w.proc.poll() is None]
            ready = [w for w in live if os.path.exists(w.socket_path)]
            worker = (ready or live or [None])[0]
            if worker is not None:
                idle.remove(worker)
        self._wake.set()
        return worker

    @staticmethod
    def hand(worker: WorkerProcess, name: str, profile: SandboxProfile, files: Mapping[str, int],
             timeout: float) -> None:
        """Give a taken worker its model: the model's cgroup limits first, then one LOAD with the
        sealed memfds (waiting up to `timeout` for a worker still starting). Any exception is a failure
        (the caller kills the worker and spawns one instead)."""
        worker.name, worker.profile = name, profile
        cgroup = worker.sandboxed.cgroup
        if cgroup is not None:
            cgroup.set_limits(profile.memory_bytes, profile.pids_max)
        names = sorted(files)
        # Everything a spawned worker's spec carries for its model (sandbox/launcher.worker_spec), engine
        # options too (mlx-lm's prompt and token limits).
        handoff = ModelHandoff(files={n: i for i, n in enumerate(names)}, max_message_bytes=profile.max_message_bytes,
                               engine_options=dict(profile.engine_options), batching=profile.batching,
                               freed_buffer_bytes=profile.freed_buffer_bytes)
        body = json.dumps(dataclasses.asdict(handoff)).encode()
        deadline = time.monotonic() + timeout
        while True:
            if worker.proc.poll() is not None:
                raise OSError("the pool worker has exited")
            try:
                sock = hop.connect(worker.socket_path)
                break
            except OSError:   # not listening yet
                if time.monotonic() > deadline:
                    raise TimeoutError("the pool worker did not listen in time") from None
                time.sleep(0.002)
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            hop.send_load(sock, body, [files[n] for n in names])
        finally:
            sock.close()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            idle, self._idle = [w for ws in self._idle.values() for w in ws], {}
        self._wake.set()
        for worker in idle:
            worker.kill()

    # -- the background refill ----------------------------------------------------------------------
    def _refill(self) -> None:
        failures = 0
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            with self._lock:
                if self._stopped:
                    return
                short = [(key, profile) for key, profile in self._profiles.items()
                         if len(self._idle.get(key, [])) < self.size]
            for key, profile in short:
                try:
                    worker = self._spawn(profile)
                except ModelUnavailable as exc:
                    failures += 1
                    log.warning("warm pool: cannot start a %s worker: %s", profile.engine, exc)
                    time.sleep(min(0.5 * 2 ** failures, 30.0))
                    self._wake.set()
                    break
                failures = 0
                with self._lock:
                    keep = not self._stopped and key in self._idle
                    if keep:
                        self._idle[key].append(worker)
                if not keep:
                    worker.kill()
                    continue
                threading.Thread(target=self._watch, args=(key, worker), daemon=True,
                                 name=f"pool-watch-{worker.proc.pid}").start()
                self._wake.set()   # until every profile has its K

    def _watch(self, key: SandboxProfile, worker: WorkerProcess) -> None:
        """An idle pool worker that dies is dropped (and audited) and replaced."""
        rc = worker.proc.wait()
        with self._lock:
            idle = self._idle.get(key, [])
            was_idle = worker in idle
            if was_idle:
                idle.remove(worker)
        if was_idle:
            worker.kill()   # its socket directory and cgroup
            self.audit.event("pool_worker_died", engine=key.engine, worker_pid=worker.proc.pid,
                             reason=f"worker {describe_exit(rc)} while idle")
            self._wake.set()


class EarlyStart:
    """Without a pool (warm_pool = 0): one pool-style worker started when a load begins, so its sandbox,
    interpreter and engine import overlap the model's verification. It gets nothing of the model until
    verification has succeeded (the load then `take`s it and hands it the sealed fds, as from the pool);
    it serves that load's model only, and is killed when the load does not take it (a refusal, say)."""

    def __init__(self, spawn: Callable[[], WorkerProcess]):
        self._worker: WorkerProcess | None = None
        self._thread = threading.Thread(target=self._run, args=(spawn,), name="early-start", daemon=True)
        self._thread.start()

    def _run(self, spawn) -> None:
        try:
            self._worker = spawn()
        except Exception as exc:   # the load spawns as usual and reports its own failure
            log.warning("early worker start failed: %s", exc)

    def take(self, profile: SandboxProfile) -> WorkerProcess | None:
        """The started worker, if it is alive and fits `profile`; None otherwise (the caller spawns)."""
        self._thread.join()
        worker, self._worker = self._worker, None
        if worker is not None and (pool_key(worker.profile) != pool_key(profile) or worker.proc.poll() is not None):
            worker.kill()
            return None
        return worker

    def discard(self) -> None:
        self._thread.join()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
