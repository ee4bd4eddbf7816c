"""The supervisor: each model's state machine and the calls proxied to its worker.

Data flows one way: a load request is checked against the trust policy and
verified (the trust library), the verified bytes (sealed memfds) are handed
to a freshly launched sandboxed worker (daemon/worker_process.py), and
inference requests are forwarded to that worker as untouched bytes. The
public server (daemon/server.py) uses only the methods under "the narrow
interface" below (status, metadata, names, ready, and `infer`, a coroutine
run on the server's event loop), plus load and unload (in a thread pool).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import logging
import os
import shutil
import threading
import time

import grpc

from ..proto import inference_pb2 as pb
from ..proto.hop import MAX_QUEUED_CALLS, release
from ..proto.wire import INFER_RESPONSE_PARAMETERS, PeekError, bool_parameters, check_complete
from ..sandbox import launcher
from ..sandbox.profile import SandboxProfile
from . import errors
from .audit import AuditLog
from .metrics import Metrics, death_kind
from .phases import LoadPhases
from .config import Config, ConfigError, ModelConfig, load_config
from .fetching import Fetcher, FetchBusy
from .preflight import preflight
from .provenance import Provenance
from .worker_hop import OFFLOAD_BYTES, HopClosed, HopTimeout, StreamBacklog, WorkerStatus, copy_out, finished
from .warm_pool import EarlyStart, WarmPool
from .worker_process import ModelUnavailable, Spawner, WorkerProcess, describe_exit

log = logging.getLogger("sealboxd")

__all__ = ["LoadRefused", "ModelStatus", "ModelUnavailable", "State", "Supervisor"]


class State(str, enum.Enum):
    UNLOADED = "UNLOADED"
    LOADING = "LOADING"
    FETCHING = "FETCHING"   # a remote model's files are being fetched into the store (reason: progress)
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


class LoadRefused(Exception):
    """Verification refused the model: gRPC PERMISSION_DENIED. Nothing was handed to a worker."""


@dataclasses.dataclass(frozen=True)
class ModelStatus:
    """A model's state, reason and version, replaced as one value: a reader never sees a mix."""
    name: str
    state: State = State.UNLOADED
    reason: str = ""
    version: str = ""

    def describe(self) -> str:
        """The state as clients see it: model 'x' is unavailable: reason."""
        return f"model '{self.name}' is {self.state.value.lower()}" + (f": {self.reason}" if self.reason else "")


@dataclasses.dataclass
class ManagedModel:
    config: ModelConfig
    status: ModelStatus = None   # set in __post_init__
    metadata: bytes | None = None   # the serialized ModelMetadataResponse served, made once per load
    # One slot per instance (config `instances`): a running WorkerProcess, or None while that instance
    # is (re)starting. All instances run on the same sealed memfds (`verified`).
    workers: tuple = ()
    verified: object = None   # a sealbox VerifiedModel while loaded
    failures: dict = dataclasses.field(default_factory=dict)   # slot -> deaths since it last served
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    generation: int = 0
    files_seen: object = None   # files_fingerprint() before the last verification: a reload compares it
    # Guards (status, workers, metadata) as one view for readers on the event loop; held only for
    # attribute updates, never across I/O (`lock` above is held for whole loads).
    view_lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    turns: object = dataclasses.field(default_factory=itertools.count)   # round-robin among equals

    def __post_init__(self):
        self.status = ModelStatus(self.config.name)

    def set_state(self, state: State, reason: str = "", version: str | None = None, **view) -> None:
        """Replace the state (and any of workers=, metadata=, verified=, config=) as one step readers
        see whole: a hand-over swaps all of them at once."""
        with self.view_lock:
            version = self.status.version if version is None else version
            for key, value in view.items():
                assert key in ("workers", "metadata", "verified", "config")
                setattr(self, key, tuple(value) if key == "workers" else value)
            self.status = ModelStatus(self.config.name, state, reason, version)

    @property
    def worker(self) -> WorkerProcess | None:
        """The first running instance (or None)."""
        return next((w for w in self.workers if w is not None), None)

    def snapshot(self) -> tuple[ModelStatus, WorkerProcess | None, bytes | None]:
        """(status, a running instance or None, metadata), consistent."""
        with self.view_lock:
            return self.status, self.worker, self.metadata

    def enter_call(self) -> tuple[ModelStatus, WorkerProcess | None, object]:
        """(status, worker, hop) for one inference call: the least-loaded running instance (ties
        taken in turn), its in-flight count raised under the view lock, so a hand-over that swaps
        workers after this sees the call and drains it."""
        with self.view_lock:
            status, workers = self.status, self.workers
            if status.state != State.READY or not workers:
                return status, None, None
            start = next(self.turns)
            best = None
            for i in range(len(workers)):
                worker = workers[(start + i) % len(workers)]
                if worker is None or worker.stopping or worker.proc.returncode is not None:   # reaped: dead
                    continue
                if best is None or worker.inflight < best.inflight:
                    best = worker
            hop = best.hop() if best is not None else None
            if hop is None:
                return status, best, None
            best.inflight += 1
            return status, best, hop

    @property
    def state(self) -> State:
        return self.status.state

    @property
    def reason(self) -> str:
        return self.status.reason

    @property
    def version(self) -> str:
        return self.status.version


class Supervisor:
    def __init__(self, config: Config, audit: AuditLog, metrics: Metrics | None = None):
        self.config, self.audit = config, audit
        self.metrics = metrics if metrics is not None else Metrics()
        self.models = {name: ManagedModel(cfg) for name, cfg in config.models.items()}
        self.spawner = Spawner()
        self.stopped = threading.Event()
        self.initial_load_done = threading.Event()
        self.reload_lock = threading.Lock()   # one configuration reload at a time
        self.draining: set[WorkerProcess] = set()   # replaced workers finishing their calls
        self._spawns = itertools.count(1)   # unique worker directory names, across hand-overs
        self.fetcher = Fetcher(config, audit)   # remote models (source = "https://..."): the store
        self._early: dict[str, EarlyStart] = {}   # model -> the worker its running load started (warm_pool = 0)
        self.pool = WarmPool(config.workers.warm_pool, self._spawn_pool_worker, audit) \
            if config.workers.warm_pool else None

    def profile_for(self, model: ModelConfig, config: Config | None = None,
                    weights_bytes: int | None = None) -> SandboxProfile:
        """This model's sandbox: [workers] settings with the model's overrides (decided in SandboxProfile)."""
        w = (config or self.config).workers
        return SandboxProfile.for_model(
            model.format, user=w.user, python=w.python,
            memory_bytes=model.memory_bytes or w.memory_bytes, pids_max=model.pids_max or w.pids_max,
            load_timeout_s=model.load_timeout_s or w.load_timeout_s,
            infer_timeout_s=model.infer_timeout_s or w.infer_timeout_s,
            seccomp=w.seccomp, landlock=w.landlock, cgroups=w.cgroups, openblas=w.openblas,
            julia=w.julia, julia_depot=w.julia_depot, max_message_bytes=self.config.server.max_message_bytes,
            engine_options=model.engine_options, weights_bytes=weights_bytes, batching=model.batching)

    def preflight(self) -> list[str]:
        """Refuse to run if workers cannot be sandboxed as configured; return warnings to log."""
        return preflight(self.config)

    def get(self, name: str) -> ManagedModel:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"unknown model '{name}'") from None

    def load_all(self):
        threads = [threading.Thread(target=self._load_quietly, args=(name,), daemon=True)
                   for name, m in self.models.items() if m.config.load]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.initial_load_done.set()
        self._configure_pool()

    def _configure_pool(self) -> None:
        """The warm pool keeps [workers] warm_pool workers for each worker profile a model needs."""
        if self.pool is not None:
            w = self.config.workers
            self.pool.configure({self.profile_for(m.config) for m in self.models.values()}, w.memory_bytes, w.pids_max)

    def _spawn_pool_worker(self, profile: SandboxProfile, label: str = "") -> WorkerProcess:
        """A warm-pool worker: sandboxed and confined, no model yet (daemon/warm_pool.py); `label`, an
        early start's model name."""
        if self.stopped.is_set():
            raise ModelUnavailable("the daemon is stopping")
        label = label or f"pool-{profile.engine}"
        socket_dir = None
        try:
            socket_dir = launcher.make_socket_dir(self.config.server.run_dir,
                                                  f"{os.getpid()}-{label}-{next(self._spawns)}", profile)
            sandboxed = self.spawner.call(lambda: launcher.launch(profile, socket_dir, {}, pool=True))
        except Exception as exc:
            if socket_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise ModelUnavailable(f"sandbox unavailable: {exc}") from None
        return WorkerProcess(label, profile, socket_dir, sandboxed, self.config.server.max_message_bytes)

    def _load_quietly(self, name):
        try:
            self.load(name, queue_fetch=True)
        except (ModelUnavailable, LoadRefused) as exc:
            log.warning("model %s not loaded: %s", name, exc)
        except Exception as exc:  # a bug must not leave the model looking merely "unloaded"
            log.exception("model %s: internal error while loading", name)
            model = self.models[name]
            model.set_state(State.UNAVAILABLE, f"internal error while loading: {exc!r}")

    def load(self, name: str, config: ModelConfig | None = None, queue_fetch: bool = False) -> None:
        """Verify, launch, wait until ready. Raises LoadRefused or ModelUnavailable.

        queue_fetch (start-up, reload): a remote model waits in line for a fetch slot; without it (the
        repository API) it is refused at once when every slot is taken.

        A model that is serving keeps serving until its replacement is READY (`_hand_over`); a
        refused or failed replacement leaves it serving. `config` replaces the model's config (a
        reload) once the model runs on it."""
        from ..trust import VerificationError, verify_model  # noqa: the trust library

        model = self.get(name)
        wanted = config or model.config
        if wanted.source is not None and name in self.fetcher.active:
            # Refused, not queued: a caller cannot pile up fetches behind the one running.
            raise ModelUnavailable(f"model '{name}' is being fetched already")
        with model.lock, contextlib.ExitStack() as leftover:
            if self.stopped.is_set():
                raise ModelUnavailable("the daemon is stopping")
            cfg = config or model.config
            status, worker, _ = model.snapshot()
            serving = status.state == State.READY and worker is not None
            if self.pool is None and not serving and cfg.instances == 1 and self.config.workers.early_start:
                self._early_start(cfg, leftover)
            if not serving:
                model.set_state(State.LOADING, "verifying", config=cfg)
            model.files_seen = files_fingerprint(cfg)   # before verifying: a change during it shows next time
            phases = LoadPhases()
            try:
                path, policy = cfg.path, cfg.policy
                if cfg.source is not None:   # fetched into the store, then verified there like a directory
                    path, policy = self._fetch(model, cfg, serving, queue_fetch)
                verified = verify_model(name, path, policy, self.config.server.state_dir, self.audit,
                                        record_version=False,   # recorded once the new worker is READY
                                        store_links=cfg.source is not None)
            except VerificationError as exc:
                self.metrics.verification(name, getattr(exc, "check", "unknown"), "refused")
                reason = f"verification refused: {exc}"
                if serving:   # a refused new version leaves the serving one serving
                    self.audit.event("model_update", model=name, verdict="refused", reason=reason,
                                     serving=status.version)
                else:
                    model.set_state(State.UNAVAILABLE, reason)
                raise LoadRefused(reason) from None
            self.metrics.verification(name, "all", "accepted")
            if cfg.source is not None:
                self.fetcher.hold(name, path)   # store gc keeps this view while the model may serve it
            phases.verified(verified.hash_s)
            if serving:
                self._hand_over(model, cfg, verified, phases)
                return
            try:
                self._stop_worker(model, State.LOADING, "loading")
                model.verified, model.failures = verified, {}
                model.set_state(State.LOADING, "loading", verified.version or "")
                self._start_worker(model, phases)
            except Exception as exc:
                verified.close()  # never served: free the sealed copies now
                model.verified = None
                if isinstance(exc, ModelUnavailable):
                    raise
                # A bug, not a verdict: still an answer with a reason, never UNKNOWN with an empty one.
                log.exception("model %s: internal error while loading", name)
                model.set_state(State.UNAVAILABLE, f"internal error while loading: {exc!r}", workers=())
                self.audit.event("model_load", model=name, verdict="failed", reason=model.reason)
                raise ModelUnavailable(model.reason) from None

    def _early_start(self, cfg: ModelConfig, leftover: contextlib.ExitStack) -> None:
        """Start this load's worker now, while the model is verified (warm_pool.EarlyStart); whatever
        the load does not take is killed when it ends (caller holds model.lock)."""
        w = self.config.workers
        profile = dataclasses.replace(self.profile_for(cfg), memory_bytes=w.memory_bytes, pids_max=w.pids_max,
                                      batching=None)
        early = self._early[cfg.name] = EarlyStart(lambda: self._spawn_pool_worker(profile, label=cfg.name))

        def discard() -> None:
            self._early.pop(cfg.name, None)
            early.discard()
        leftover.callback(discard)

    def _fetch(self, model: ManagedModel, cfg: ModelConfig, serving: bool, queue_fetch: bool):
        """A remote model's view in the store and the policy to verify it with (caller holds model.lock);
        FETCHING with progress in the reason unless an older version keeps serving."""
        def progress(text: str) -> None:
            if not serving:
                model.set_state(State.FETCHING, text)
        try:
            return self.fetcher.fetch(cfg, progress, wait=queue_fetch)
        except FetchBusy as exc:
            if not serving:
                model.set_state(State.UNAVAILABLE, str(exc))
            raise ModelUnavailable(str(exc)) from None

    def _launch(self, cfg: ModelConfig, verified, slot: int = 0) -> WorkerProcess:
        """Start a sandboxed worker (instance `slot`) on `verified` (not waiting for it); ModelUnavailable
        if the sandbox cannot be made ("sandbox unavailable: ..."). Touches no model state."""
        if self.stopped.is_set():
            raise ModelUnavailable("the daemon is stopping")
        profile = self.profile_for(cfg, weights_bytes=sum(verified.sizes.values()))
        # A started worker waiting for this model's fds: this load's early start, else one from the pool.
        early = self._early.pop(cfg.name, None) if slot == 0 else None
        worker, path = None, "pool"
        if early is not None:
            worker, path = early.take(profile), "early"
        elif self.pool is not None:
            worker = self.pool.take(profile)
        if worker is not None:
            try:
                WarmPool.hand(worker, cfg.name, profile, verified.files, profile.load_timeout_s)
                worker.path = path
                return self._bind(worker, cfg, verified, slot)
            except Exception as exc:   # it died, never listened, or its cgroup refused the limits: spawn instead
                log.warning("model %s: %s worker unusable (%s); spawning one", cfg.name,
                            "early-started" if path == "early" else "warm-pool", exc)
                worker.kill()
        socket_dir = None
        try:
            # The pid keeps two daemons sharing a run_dir out of each other's way (and names what a
            # daemon that died left behind: cleaned up at the next start).
            socket_dir = launcher.make_socket_dir(self.config.server.run_dir,
                                                  f"{os.getpid()}-{cfg.name}-{next(self._spawns)}", profile)
            sandboxed = self.spawner.call(lambda: launcher.launch(profile, socket_dir, verified.files))
        except Exception as exc:  # SandboxUnavailable, OSError, SubprocessError from a failed preexec
            if socket_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise ModelUnavailable(f"sandbox unavailable: {exc}") from None
        worker = WorkerProcess(cfg.name, profile, socket_dir, sandboxed, self.config.server.max_message_bytes)
        return self._bind(worker, cfg, verified, slot)

    def _bind(self, worker: WorkerProcess, cfg: ModelConfig, verified, slot: int) -> WorkerProcess:
        """What the supervisor attaches to a worker started for (or handed) a model."""
        worker.slot = slot
        if cfg.batching is not None:
            limit, version = cfg.batching.max_batch_size, verified.version or ""
            longest_ns = int(worker.profile.infer_timeout_s * 1e9)   # a longer engine call is killed

            def executed(rows: int, ns: int) -> None:   # bounded labels: a worker's claim past the limit is dropped
                if 0 < rows <= limit:
                    self.metrics.observe_execution(cfg.name, version, rows, ns, longest_ns)
            worker.on_execution = executed
        # Bound to this worker: its answers are stamped with the model it was started from.
        worker.provenance = Provenance.of(verified)
        worker.stamp = worker.provenance.stamp()
        return worker

    def _launch_ready(self, cfg: ModelConfig, verified, version: str, slots,
                      phases: LoadPhases) -> tuple[list, bytes]:
        """Start one worker per slot on the same sealed copies (verified once), all loading at once,
        and wait until every one answers Describe: (workers, metadata). Any failure kills them all
        (ModelUnavailable with the first reason): a model loads whole or not at all."""
        workers = []
        try:
            phases.spawning()
            for slot in slots:
                workers.append(self._launch(cfg, verified, slot))
            metadata = None
            for worker in workers:
                answer = worker.wait_ready(worker.profile.load_timeout_s)
                if metadata is None:   # the first instance's answer: spawn ends, its own phases
                    phases.answered(answer)
                metadata = metadata or self._served_metadata(cfg.name, version, answer, worker.provenance)
            return workers, metadata
        except BaseException:
            for worker in workers:
                worker.kill()
            raise

    def _start_worker(self, model: ManagedModel, phases: LoadPhases | None = None) -> None:
        """Launch the model's instances on model.verified and wait until they serve (caller holds model.lock);
        `phases` carries the load's verification time (a restart starts its own)."""
        name = model.config.name
        model.generation += 1
        generation = model.generation
        started = time.monotonic()
        phases = phases or LoadPhases()
        try:
            workers, metadata = self._launch_ready(model.config, model.verified, model.version,
                                                   range(model.config.instances), phases)
        except ModelUnavailable as exc:
            model.set_state(State.UNAVAILABLE, str(exc), workers=())
            self.audit.event("model_load", model=name, verdict="failed", reason=model.reason)
            raise
        model.failures = {}
        model.set_state(State.READY, _instances_reason(workers), workers=workers, metadata=metadata)
        self._served(model, workers, generation, started, phases)

    def _served(self, model: ManagedModel, workers: list, generation: int, started: float, phases: LoadPhases,
                **audit) -> None:
        """Workers just became the model's READY instances: record the version, audit, watch them."""
        name = model.config.name
        now = time.monotonic()
        for worker in workers:
            worker.ready_at = now
        self.metrics.load_duration(name, now - started, model.version)
        self._record_version(model)
        timings = phases.fields(max(w.ready_at for w in workers))
        self.audit.event("model_load", model=name, verdict="ready", **workers[0].provenance.audit_fields(),
                         engine=model.config.format, worker_pid=workers[0].proc.pid,
                         worker_pids=[w.proc.pid for w in workers], instances=len(workers),
                         path="+".join(sorted({w.path for w in workers})), **audit, **timings)
        log.info("model %s%s %s", name, f" version {model.version}" if model.version else "",
                 LoadPhases.describe(timings))
        for worker in workers:
            self._watch_soon(model, worker, generation)

    def _watch_soon(self, model: ManagedModel, worker: WorkerProcess, generation: int) -> None:
        threading.Thread(target=self._watch, args=(model, worker, generation), daemon=True,
                         name=f"watch-{model.config.name}-{worker.slot}").start()

    def _record_version(self, model: ManagedModel) -> None:
        """Rollback protection: the version counts as accepted once a worker serves it, never before
        (a version that verifies but fails to load must not lock out the one serving)."""
        from ..trust import VerificationError, record_version
        version = getattr(model.verified, "version", None)
        if version and self.config.server.state_dir:
            try:
                record_version(self.config.server.state_dir, model.config.name, version,
                               getattr(model.verified, "record_digest", None))
            except (OSError, VerificationError) as exc:
                log.error("model %s: cannot record version %s in %s: %s", model.config.name, version,
                          self.config.server.state_dir, exc)

    def _hand_over(self, model: ManagedModel, cfg: ModelConfig, verified, phases: LoadPhases) -> None:
        """Replace a serving model without downtime (caller holds model.lock): start the new version's
        instances on `verified` and wait until all are READY (warmed up) while the old ones keep
        serving, then swap in one step; the old workers finish the calls they have in flight and
        stop. A replacement that fails leaves the old ones serving, audited; ModelUnavailable says why."""
        name = cfg.name
        with model.view_lock:
            old_status, old_workers = model.status, [w for w in model.workers if w is not None]
        old_verified = model.verified
        version = verified.version or ""
        started = time.monotonic()
        phases.spawning()
        keeps = f"version '{old_status.version}' keeps serving" if old_status.version else "the old version keeps serving"
        try:
            workers, metadata = self._launch_ready(cfg, verified, version, range(cfg.instances), phases)
        except ModelUnavailable as exc:
            verified.close()
            self.audit.event("model_update", model=name, verdict="failed", reason=str(exc), serving=old_status.version)
            raise ModelUnavailable(f"{exc}; {keeps}") from None
        model.generation += 1   # the old workers' watchers and restart timers stand down
        generation = model.generation
        model.failures = {}
        model.set_state(State.READY, _instances_reason(workers), version, workers=workers, metadata=metadata,
                        verified=verified, config=cfg)
        self._served(model, workers, generation, started, phases, replaced=old_status.version)
        self._drain_soon(name, old_workers, old_verified)

    def _drain_soon(self, name: str, workers: list, verified) -> None:
        """Let replaced workers finish the calls in flight on them (bounded by the inference timeout),
        then stop them and close their sealed copies; on a thread of its own."""
        workers = [w for w in workers if w is not None]
        if not workers:
            if verified is not None:
                verified.close()
            return
        self.draining.update(workers)

        def drain():
            deadline = time.monotonic() + max(w.profile.infer_timeout_s for w in workers)
            try:
                for worker in workers:
                    while worker.inflight > 0 and time.monotonic() < deadline and worker.proc.poll() is None:
                        time.sleep(0.005)
                    left = worker.inflight
                    try:
                        worker.kill()
                    except Exception:
                        log.exception("model %s: stopping a replaced worker failed", name)
                    finally:
                        self.draining.discard(worker)
                    self.audit.event("worker_drained", model=name, worker_pid=worker.proc.pid, cut_calls=left)
            finally:
                if verified is not None:
                    verified.close()
        threading.Thread(target=drain, daemon=True, name=f"drain-{name}").start()

    STABLE_S = 60.0  # a worker that lived this long (or served a call) before dying starts the backoff afresh

    def _watch(self, model: ManagedModel, worker: WorkerProcess, generation: int) -> None:
        """One instance's death: its slot restarts with backoff from the same sealed copies; the model
        stays READY while another instance is (UNAVAILABLE with the reason once none is)."""
        worker.proc.wait()
        if worker.stopping or self.stopped.is_set():
            return
        slot = worker.slot
        try:
            reason = worker.death_reason("while serving")
            with model.lock:
                if model.generation != generation or slot >= len(model.workers) or model.workers[slot] is not worker:
                    return
                worker.kill()
                workers = list(model.workers)
                workers[slot] = None
                if worker.ready_at is not None and time.monotonic() - worker.ready_at > self.STABLE_S:
                    model.failures[slot] = 0
                if any(w is not None for w in workers):
                    model.set_state(State.READY, _instances_reason(workers, f"instance {slot + 1}: {reason}"),
                                    workers=workers)
                else:
                    model.set_state(State.UNAVAILABLE, reason, workers=workers, metadata=None)
                delay = self._schedule_restart(model, slot)
            self.metrics.worker_death(model.config.name, death_kind(reason), model.version)
            extra = {"instance": slot + 1} if len(workers) > 1 else {}
            self.audit.event("worker_died", model=model.config.name, reason=reason, restart_in_s=delay,
                             worker_pid=worker.proc.pid, **extra)
        except Exception:  # the watcher must not die silently and leave a dead worker looking READY
            log.exception("model %s: handling the worker's death failed", model.config.name)
            with model.lock:
                if model.generation == generation:
                    model.set_state(State.UNAVAILABLE, "worker died; see the daemon log")

    @staticmethod
    def _served_metadata(name: str, version: str, answer: bytes, provenance: Provenance) -> bytes:
        """The ModelMetadataResponse clients get, made once per load from the worker's (bounded) answer;
        its parameters are the supervisor's provenance only."""
        from google.protobuf.message import DecodeError
        try:
            response = pb.ModelMetadataResponse.FromString(answer)
        except DecodeError:
            raise ModelUnavailable("the worker's metadata answer is malformed") from None
        response.name = name
        response.versions[:] = [version] if version else []
        response.parameters.clear()
        for key, value in provenance.parameters().items():
            response.parameters[key].string_param = value
        return response.SerializeToString()

    def _schedule_restart(self, model: ManagedModel, slot: int) -> float:
        """Restart one instance from the same sealed copies after an exponential backoff (caller holds model.lock)."""
        failures = model.failures[slot] = model.failures.get(slot, 0) + 1
        first, longest = self.config.workers.restart_backoff_s
        delay = min(first * 2 ** (failures - 1), longest)
        timer = threading.Timer(delay, self._restart, args=(model, model.generation, slot))
        timer.daemon = True
        timer.start()
        return delay

    def _restart(self, model: ManagedModel, generation: int, slot: int) -> None:
        with model.lock:
            # The sealed memfds still hold the verified bytes: no re-verification needed.
            if (self.stopped.is_set() or model.generation != generation or model.verified is None
                    or slot >= len(model.workers) or model.workers[slot] is not None):
                return
            self.metrics.worker_restart(model.config.name, model.version)
            name, started = model.config.name, time.monotonic()
            phases = LoadPhases()   # a restart: no verification, its own spawn
            try:
                (worker,), metadata = self._launch_ready(model.config, model.verified, model.version, [slot],
                                                         phases)
            except ModelUnavailable as exc:
                delay = self._schedule_restart(model, slot)
                log.warning("restart of %s failed: %s; next try in %g s", name, exc, delay)
                if not any(w is not None for w in model.workers):
                    model.set_state(State.UNAVAILABLE, str(exc))
                self.audit.event("model_load", model=name, verdict="failed", reason=str(exc))
                return
            with model.view_lock:
                workers = list(model.workers)
                workers[slot] = worker
                model.set_state(State.READY, _instances_reason(workers), workers=workers,
                                metadata=model.metadata or metadata)
            worker.ready_at = time.monotonic()
            self.metrics.load_duration(name, worker.ready_at - started, model.version)
            extra = {"instance": slot + 1} if len(workers) > 1 else {}
            timings = phases.fields(worker.ready_at)
            self.audit.event("model_load", model=name, verdict="ready", **worker.provenance.audit_fields(),
                             engine=model.config.format, worker_pid=worker.proc.pid, path=worker.path, restart=True,
                             **extra, **timings)
            log.info("model %s%s %s", name, f" version {model.version}" if model.version else "",
                     LoadPhases.describe(timings))
            self._watch_soon(model, worker, generation)

    def _stop_worker(self, model: ManagedModel, state: State, reason: str) -> None:
        """Stop every instance and close the sealed copies (caller holds model.lock)."""
        model.generation += 1
        workers = model.workers
        model.set_state(state, reason, workers=(), metadata=None)
        for worker in workers:
            if worker is not None:
                worker.kill()
        if model.verified is not None:
            model.verified.close()
            model.verified = None

    def unload(self, name: str) -> None:
        model = self.get(name)
        with model.lock:
            self._stop_worker(model, State.UNLOADED, "unloaded")
            self.fetcher.release(name)
        self.audit.event("model_unload", model=name)

    # -- configuration reload (SIGHUP)
    def reload_file(self) -> bool:
        """Re-read the config file and apply it (reload). A config that does not parse or check,
        or asks for a sandbox layer this host lacks, changes nothing: the running one stays, the
        reason is logged and audited. Never raises. Runs on a thread (never on the event loop)."""
        from ..sandbox.launcher import SandboxUnavailable
        path = self.config.path
        try:
            config = load_config(path)
            self.reload(config)
            return True
        except (ConfigError, SandboxUnavailable) as exc:
            log.error("config reload refused, the running config is kept: %s", exc)
            self.audit.event("config_reload", config=path, verdict="refused", reason=str(exc))
        except Exception as exc:  # never die on a reload
            log.exception("config reload failed, the running config is kept")
            self.audit.event("config_reload", config=path, verdict="refused", reason=f"internal error: {exc!r}")
        return False

    def _launch_key(self, model: ModelConfig, config: Config) -> tuple:
        """What a worker is made from, apart from the model's files: a change needs a new worker."""
        return dataclasses.replace(model, load=True), self.profile_for(model, config)

    def reload(self, config: Config) -> None:
        """Apply a new configuration without downtime: models added are loaded (load = true),
        removed ones drained and dropped, changed ones (path, format, policy, limits, [workers]) and
        ones whose files changed on disk verified again and handed over to a new worker while the
        old one serves. [server] changes need a restart: logged, the running values kept."""
        with self.reload_lock:
            if self.stopped.is_set():
                return
            old = self.config
            for field in dataclasses.fields(old.server):
                if getattr(old.server, field.name) != getattr(config.server, field.name):
                    log.warning("config reload: [server] %s changed: needs a restart; the running value is kept",
                                field.name)
            config = dataclasses.replace(config, server=old.server)
            self.fetcher.config = config
            if config.workers != old.workers:
                for line in preflight(config):   # SandboxUnavailable: refused, nothing changed
                    log.warning("%s", line)
            added = [n for n in config.models if n not in self.models]
            removed = [n for n in self.models if n not in config.models]
            self.config = config
            models = dict(self.models)
            for n in added:
                models[n] = ManagedModel(config.models[n])
            self.models = models   # replaced whole: readers iterating the old dict are undisturbed
            outcome: dict[str, str] = {}
            jobs = [threading.Thread(target=self._reload_model, args=(n, config.models[n], config, added, outcome),
                                     daemon=True, name=f"reload-{n}") for n in config.models]
            jobs += [threading.Thread(target=self._remove, args=(n, outcome), daemon=True, name=f"remove-{n}")
                     for n in removed]
            for job in jobs:
                job.start()
            for job in jobs:
                job.join()
            changes = {k: sorted(n for n, v in outcome.items() if v == k)
                       for k in ("added", "removed", "replaced", "loaded", "refused", "failed")}
            self._configure_pool()
            log.info("config reloaded from %s: %s", config.path,
                     "; ".join(f"{k} {', '.join(v)}" for k, v in changes.items() if v) or "no model changed")
            self.audit.event("config_reload", config=config.path, verdict="accepted",
                             **{k: v for k, v in changes.items() if v})

    def _reload_model(self, name: str, cfg: ModelConfig, config: Config, added: list, outcome: dict) -> None:
        model = self.models[name]
        with model.lock:
            status, worker, _ = model.snapshot()
            loaded = status.state == State.READY or model.verified is not None
            changed = self._launch_key(model.config, config) != self._launch_key(cfg, config)
            files_changed = model.files_seen is not None and files_fingerprint(cfg) != model.files_seen
            if loaded and not (changed or files_changed):
                model.set_state(status.state, status.reason, config=cfg)   # `load` only, say
                return
            if not loaded and not (cfg.load and (changed or files_changed or model.files_seen is None)):
                model.set_state(status.state, status.reason, config=cfg)
                return
            what = "added" if name in added else ("replaced" if loaded else "loaded")
            try:
                self.load(name, cfg, queue_fetch=True)
                outcome[name] = what
            except LoadRefused as exc:
                outcome[name] = "refused"
                log.warning("model %s not (re)loaded: %s", name, exc)
            except ModelUnavailable as exc:
                outcome[name] = "failed"
                log.warning("model %s not (re)loaded: %s", name, exc)
            except Exception as exc:
                outcome[name] = "failed"
                log.exception("model %s: internal error while reloading", name)
                if model.state != State.READY:
                    model.set_state(State.UNAVAILABLE, f"internal error while loading: {exc!r}")

    def _remove(self, name: str, outcome: dict) -> None:
        """A model removed from the config: gone for new calls at once, its worker drained."""
        model = self.models[name]
        with model.lock:
            model.generation += 1
            workers = model.workers
            verified = model.verified
            model.set_state(State.UNLOADED, "removed from the configuration", workers=(), metadata=None,
                            verified=None)
            models = dict(self.models)
            models.pop(name, None)
            self.models = models
            self._drain_soon(name, workers, verified)
            self.fetcher.release(name)
        outcome[name] = "removed"
        self.audit.event("model_unload", model=name, reason="removed from the configuration")

    # -- the narrow interface the public server uses
    def names(self) -> list[str]:
        return sorted(self.models)

    def calls_at_workers(self, name: str) -> int:
        """How many calls the front door lets through to the model's workers at once: [server.limits]
        model_inflight per instance, or with dynamic batching enough to fill a batch (max_batch_size
        requests), at most half of what a worker holds (hop.MAX_QUEUED_CALLS)."""
        cfg = self.get(name).config
        per_worker = self.config.server.limits.model_concurrency
        if cfg.batching is not None:
            per_worker = max(per_worker, cfg.batching.max_batch_size)
        per_worker = min(per_worker, MAX_QUEUED_CALLS // 2)
        return cfg.instances * per_worker

    def status(self, name: str) -> ModelStatus:
        """A consistent snapshot of the model's state, reason and version; KeyError if unknown."""
        return self.get(name).status

    def metadata(self, name: str) -> tuple[ModelStatus, bytes]:
        """The loaded model's serialized ModelMetadataResponse (made once per load, at most
        errors.MAX_DESCRIBE_BYTES from the worker); ModelUnavailable unless READY."""
        status, _worker, metadata = self.get(name).snapshot()
        if status.state != State.READY or metadata is None:
            raise ModelUnavailable(status.reason or status.state.value.lower())
        return status, metadata

    def worker_cgroups(self) -> list[tuple[str, str, object]]:
        """(model, version, WorkerCgroup) of every live worker that has a cgroup (for metrics)."""
        found = []
        for name, model in self.models.items():
            with model.view_lock:
                status, workers = model.status, model.workers
            for worker in workers:
                cgroup = getattr(getattr(worker, "sandboxed", None), "cgroup", None)
                if cgroup is not None:
                    found.append((name, status.version, cgroup))
        return found

    async def infer(self, name: str, request, shared=None) -> bytes:
        """Forward one ModelInferRequest's bytes to the model's worker; runs on the server's event loop.
        The answer is the worker's bytes with the supervisor's provenance appended (provenance.py).
        `request` is the bytes, or a one-element list holding them that the hop empties once they are
        sent (so the caller's frames do not keep a large request alive while the worker computes).

        The caller holds one of the model's turns (admission.ModelGate), and the inference timeout
        runs from when the worker takes the call (worker_hop.py), so it measures the model, not a
        queue. Every failure leaves as an errors.ClientError with a fixed, sealbox-made text: the
        model's reason under the view lock, never the transport's text, a path or a pid."""
        model = self.get(name)
        status, worker, hop = model.enter_call()
        if hop is None:
            raise errors.unavailable(name, _reason(status))
        try:
            if shared is None:
                call = hop.infer(request, worker.profile.infer_timeout_s)
            else:   # shared-memory tensors (shared_memory.SharedCall): inputs into this worker's arenas,
                # attached; outputs copied out. The caller gives the arenas back once the call has ended.
                await finished(asyncio.get_running_loop().run_in_executor(
                    None, shared.prepare, hop.input_arenas, hop.output_arenas, worker.profile.max_message_bytes))
                call = hop.infer_shared(request, worker.profile.infer_timeout_s, shared.arena_fds, shared.arena_sizes)
            del request   # (the hop holds it until sent)
            body = await self._at_hop(name, model, worker, call)
            if shared is not None:
                body, sizes = body
                try:
                    await finished(asyncio.get_running_loop().run_in_executor(None, shared.deliver, name, sizes))
                except BaseException:
                    release(body)
                    raise
            return await self._stamped(name, model, worker, body, None)
        finally:
            worker.inflight -= 1   # a replaced worker is stopped once its calls are done
            if shared is not None:
                hop.trim_arenas_later()

    async def infer_stream(self, name: str, request: bytes):
        """The responses to one ModelStreamInfer request (an async iterator of bytes), each stamped and
        carrying Triton's triton_final_response: true on the last. A decoupled engine's responses leave
        as they are made (false), and the end is then an empty response with only the parameters (true),
        as Triton sends it. The same errors as infer()."""
        model = self.get(name)
        status, worker, hop = model.enter_call()
        if hop is None:
            raise errors.unavailable(name, _reason(status))
        responses = hop.stream(request, worker.profile.infer_timeout_s)
        del request
        try:
            while True:
                body, final = await self._at_hop(name, model, worker, responses.__anext__())
                yield await self._stamped(name, model, worker, body, final)
                if final:
                    return
        finally:
            worker.inflight -= 1
            await responses.aclose()

    async def _at_hop(self, name: str, model: ManagedModel, worker: WorkerProcess, awaitable):
        """Await one answer from the hop; every failure becomes a ClientError."""
        timeout = worker.profile.infer_timeout_s
        try:
            return await awaitable
        except HopTimeout:
            reason = f"inference timed out after {timeout:g} s; worker killed"
            self.audit.event("infer_timeout", model=name, reason=reason)
            # The watcher reports it and restarts with backoff. Off the event loop: the kill waits for the
            # worker's group to empty (measured ~30 ms for the demo model, longer for large ones), and
            # every other call would wait with it.
            await finished(asyncio.get_running_loop().run_in_executor(None, worker.sandboxed.kill))
            raise errors.unavailable(name, reason) from None
        except WorkerStatus as exc:
            raise errors.from_worker_status(name, _status_code(exc.code), exc.message) from None
        except StreamBacklog as exc:
            raise errors.ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"model '{name}': {exc}; stream cancelled") \
                from None
        except (HopClosed, OSError):   # the worker died or was stopped under us
            raise errors.unavailable(name, await self._failure_reason(model, worker)) from None

    async def _stamped(self, name: str, model: ManagedModel, worker: WorkerProcess, body, final) -> bytes:
        """The worker's response body + the supervisor's provenance (the last map entries win) and, on a
        stream, triton_final_response. Copied once out of the body, which is then released, and checked
        in the copy: a body in the call's response arena is the worker's to write until it is released."""
        tail = worker.stamp if final is None else worker.stamp + bool_parameters(
            INFER_RESPONSE_PARAMETERS, {"triton_final_response": final})
        length = len(body)
        try:
            if length <= OFFLOAD_BYTES:
                response = copy_out(body, tail)
            else:
                # A large copy runs off the event loop; the body is released once the copy is done, even
                # if this call is cancelled meanwhile (finished() waits the copy out before raising).
                response = await finished(asyncio.get_running_loop().run_in_executor(None, copy_out, body, tail))
        finally:
            release(body)
        try:
            if not response.endswith(tail):   # (a response arena's worker rewrote the room the tail went into)
                raise PeekError("the appended parameters changed")
            check_complete(memoryview(response)[:length])   # nothing in it can swallow the parameters appended
        except PeekError:
            raise errors.model_failed(name) from None
        model.failures.pop(worker.slot, None)  # it served: the next death starts the backoff afresh
        return response

    async def _failure_reason(self, model: ManagedModel, worker: WorkerProcess) -> str:
        """Why the hop failed, in the supervisor's words: the watcher's reason once it has seen the
        death (waited for briefly: the connection often breaks a moment before the exit is reaped)."""
        for _ in range(40):
            with model.view_lock:
                status, current = model.status, model.workers
            if worker not in current:
                return _reason(status)
            if worker.proc.returncode is not None:
                return f"worker {describe_exit(worker.proc.returncode)}"
            await asyncio.sleep(0.005)
        return "worker connection failed"

    def ready(self) -> bool:
        """ServerReady and grpc health: the initial loads are done and, with [server]
        strict_readiness (the default, Triton's --strict-readiness), every load = true model is READY."""
        if not self.initial_load_done.is_set() or self.stopped.is_set():
            return False
        if not self.config.server.strict_readiness:
            return True
        return all(m.status.state == State.READY for m in self.models.values() if m.config.load)

    def shutdown(self) -> None:
        self.stopped.set()
        if self.pool is not None:
            self.pool.stop()
        for worker in list(self.draining):
            try:
                worker.kill()
            except Exception:
                log.exception("stopping a replaced worker failed")
        for model in self.models.values():
            with model.lock:
                try:
                    self._stop_worker(model, State.UNLOADED, "daemon stopped")
                except Exception:  # stop every other model regardless
                    log.exception("model %s: stopping its worker failed", model.config.name)


def files_fingerprint(cfg: ModelConfig) -> tuple:
    """What a reload compares to see whether a model's files changed since its last verification,
    without reading them: (name, size, mtime, ctime, inode) of every entry under the model's path,
    of its signature and release files and of a pinned manifest. Cheap; a change here means verify
    again, never "trust it": the verification decides."""
    if cfg.source is not None:
        return (cfg.source,)   # fetched: its signature is fetched again on every load, never compared here
    entries = []

    def add(path: str) -> None:
        try:
            st = os.lstat(path)
            link = os.readlink(path) if os.path.islink(path) else None
            entries.append((path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode, link))
        except OSError as exc:
            entries.append((path, exc.errno))
    add(cfg.path)
    base = cfg.path if os.path.isdir(cfg.path) else os.path.dirname(cfg.path)
    for top, dirs, files in os.walk(cfg.path):
        dirs.sort()
        for n in sorted(dirs + files):
            add(os.path.join(top, n))
    for extra in (cfg.policy.signature, cfg.policy.release, cfg.policy.pinned_manifest):
        if extra:
            add(os.path.join(base, extra))
    return tuple(entries)


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _status_code(number: int) -> grpc.StatusCode:
    """A worker's ERROR record's code; a number gRPC does not know is UNKNOWN (mapped to INTERNAL)."""
    return _STATUS_CODES.get(number, grpc.StatusCode.UNKNOWN)


def _instances_reason(workers, detail: str = "") -> str:
    """A READY model's reason: with several instances, how many of them serve (and why one does not)."""
    if len(workers) <= 1:
        return ""
    ready = sum(w is not None for w in workers)
    return f"{ready}/{len(workers)} instances ready" + (f"; {detail}" if detail else "")


def _reason(status: ModelStatus) -> str:
    """A model's reason for not answering; never "ready" (a READY snapshot without a worker is a restart)."""
    if status.state == State.READY:
        return "worker restarting"
    return status.reason or status.state.value.lower()
