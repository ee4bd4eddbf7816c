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
import dataclasses
import enum
import logging
import os
import shutil
import threading
import time

import grpc

from ..proto import inference_pb2 as pb
from ..proto.wire import PeekError, check_complete
from ..sandbox import launcher
from ..sandbox.profile import SandboxProfile
from . import errors
from .audit import AuditLog
from .metrics import Metrics, death_kind
from .config import Config, ModelConfig
from .preflight import preflight
from .provenance import Provenance
from .worker_process import ModelUnavailable, Spawner, WorkerProcess, describe_exit

log = logging.getLogger("sealboxd")

__all__ = ["LoadRefused", "ModelStatus", "ModelUnavailable", "State", "Supervisor"]


class State(str, enum.Enum):
    UNLOADED = "UNLOADED"
    LOADING = "LOADING"
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
    worker: WorkerProcess | None = None
    verified: object = None   # a sealbox VerifiedModel while loaded
    failures: int = 0
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    generation: int = 0
    # Guards (status, worker, metadata) as one view for readers on the event loop; held only for
    # attribute updates, never across I/O (`lock` above is held for whole loads).
    view_lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)

    def __post_init__(self):
        self.status = ModelStatus(self.config.name)

    def set_state(self, state: State, reason: str = "", version: str | None = None, **view) -> None:
        """Replace the state (and any of worker=, metadata=) as one step readers see whole."""
        with self.view_lock:
            version = self.status.version if version is None else version
            for key, value in view.items():
                assert key in ("worker", "metadata")
                setattr(self, key, value)
            self.status = ModelStatus(self.config.name, state, reason, version)

    def snapshot(self) -> tuple[ModelStatus, WorkerProcess | None, bytes | None]:
        with self.view_lock:
            return self.status, self.worker, self.metadata

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

    def profile_for(self, model: ModelConfig) -> SandboxProfile:
        """This model's sandbox: [workers] settings with the model's overrides (decided in SandboxProfile)."""
        w = self.config.workers
        return SandboxProfile.for_model(
            model.format, user=w.user, python=w.python,
            memory_bytes=model.memory_bytes or w.memory_bytes, pids_max=model.pids_max or w.pids_max,
            load_timeout_s=model.load_timeout_s or w.load_timeout_s,
            infer_timeout_s=model.infer_timeout_s or w.infer_timeout_s,
            seccomp=w.seccomp, landlock=w.landlock, cgroups=w.cgroups, openblas=w.openblas,
            julia=w.julia, julia_depot=w.julia_depot, max_message_bytes=self.config.server.max_message_bytes)

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

    def _load_quietly(self, name):
        try:
            self.load(name)
        except (ModelUnavailable, LoadRefused) as exc:
            log.warning("model %s not loaded: %s", name, exc)
        except Exception as exc:  # a bug must not leave the model looking merely "unloaded"
            log.exception("model %s: internal error while loading", name)
            model = self.models[name]
            model.set_state(State.UNAVAILABLE, f"internal error while loading: {exc!r}")

    def load(self, name: str) -> None:
        """Verify, launch, wait until ready. Raises LoadRefused or ModelUnavailable."""
        from ..trust import VerificationError, verify_model  # noqa: the trust library

        model = self.get(name)
        with model.lock:
            if self.stopped.is_set():
                raise ModelUnavailable("the daemon is stopping")
            cfg = model.config
            try:
                verified = verify_model(name, cfg.path, cfg.policy, self.config.server.state_dir, self.audit)
            except VerificationError as exc:
                self.metrics.verification(name, getattr(exc, "check", "unknown"), "refused")
                reason = f"verification refused: {exc}"
                if model.state != State.READY:  # a refused reload leaves a serving model serving
                    model.set_state(State.UNAVAILABLE, reason)
                raise LoadRefused(reason) from None
            self.metrics.verification(name, "all", "accepted")
            try:
                self._stop_worker(model, State.LOADING, "loading")
                model.verified, model.failures = verified, 0
                model.set_state(State.LOADING, "loading", verified.version or "")
                self._start_worker(model)
            except Exception as exc:
                verified.close()  # never served: free the sealed copies now
                model.verified = None
                if isinstance(exc, ModelUnavailable):
                    raise
                # A bug, not a verdict: still an answer with a reason, never UNKNOWN with an empty one.
                log.exception("model %s: internal error while loading", name)
                model.set_state(State.UNAVAILABLE, f"internal error while loading: {exc!r}", worker=None)
                self.audit.event("model_load", model=name, verdict="failed", reason=model.reason)
                raise ModelUnavailable(model.reason) from None

    def _start_worker(self, model: ManagedModel) -> None:
        """Launch a worker on model.verified and wait until it serves (caller holds model.lock)."""
        if self.stopped.is_set():
            raise ModelUnavailable("the daemon is stopping")
        profile = self.profile_for(model.config)
        name = model.config.name
        model.generation += 1
        generation = model.generation
        socket_dir = None
        started = time.monotonic()
        try:
            # The pid keeps two daemons sharing a run_dir out of each other's way.
            socket_dir = launcher.make_socket_dir(self.config.server.run_dir,
                                                  f"{os.getpid()}-{name}-{generation}", profile)
            sandboxed = self.spawner.call(lambda: launcher.launch(profile, socket_dir, model.verified.files))
        except Exception as exc:  # SandboxUnavailable, OSError, SubprocessError from a failed preexec
            if socket_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
            model.set_state(State.UNAVAILABLE, f"sandbox unavailable: {exc}", worker=None)
            self.audit.event("worker_start", model=name, verdict="refused", reason=model.reason)
            raise ModelUnavailable(model.reason) from None
        worker = WorkerProcess(name, profile, socket_dir, sandboxed, self.config.server.max_message_bytes)
        # Bound to this worker: its answers are stamped with the model it was started from.
        worker.provenance = provenance = Provenance.of(model.verified)
        worker.stamp = provenance.stamp()
        model.set_state(State.LOADING, "loading", worker=worker)
        try:
            metadata = self._served_metadata(model, worker.wait_ready(profile.load_timeout_s), provenance)
        except ModelUnavailable as exc:
            worker.kill()
            model.set_state(State.UNAVAILABLE, str(exc), worker=None)
            self.audit.event("model_load", model=name, verdict="failed", reason=model.reason)
            raise
        model.set_state(State.READY, metadata=metadata)
        worker.ready_at = time.monotonic()
        self.metrics.load_duration(name, worker.ready_at - started, model.version)
        self.audit.event("model_load", model=name, verdict="ready", **provenance.audit_fields(),
                         engine=model.config.format, worker_pid=sandboxed.proc.pid)
        threading.Thread(target=self._watch, args=(model, worker, generation), daemon=True,
                         name=f"watch-{name}").start()

    STABLE_S = 60.0  # a worker that lived this long (or served a call) before dying starts the backoff afresh

    def _watch(self, model: ManagedModel, worker: WorkerProcess, generation: int) -> None:
        worker.proc.wait()
        if worker.stopping or self.stopped.is_set():
            return
        try:
            reason = worker.death_reason("while serving")
            with model.lock:
                if model.generation != generation:
                    return
                worker.kill()
                model.set_state(State.UNAVAILABLE, reason, worker=None, metadata=None)
                if worker.ready_at is not None and time.monotonic() - worker.ready_at > self.STABLE_S:
                    model.failures = 0
                delay = self._schedule_restart(model)
            self.metrics.worker_death(model.config.name, death_kind(reason), model.version)
            self.audit.event("worker_died", model=model.config.name, reason=reason, restart_in_s=delay)
        except Exception:  # the watcher must not die silently and leave a dead worker looking READY
            log.exception("model %s: handling the worker's death failed", model.config.name)
            with model.lock:
                if model.generation == generation:
                    model.set_state(State.UNAVAILABLE, "worker died; see the daemon log")

    @staticmethod
    def _served_metadata(model: ManagedModel, answer: bytes, provenance: Provenance) -> bytes:
        """The ModelMetadataResponse clients get, made once per load from the worker's (bounded) answer;
        its parameters are the supervisor's provenance only."""
        from google.protobuf.message import DecodeError
        try:
            response = pb.ModelMetadataResponse.FromString(answer)
        except DecodeError:
            raise ModelUnavailable("the worker's metadata answer is malformed") from None
        response.name = model.config.name
        response.versions[:] = [model.version] if model.version else []
        response.parameters.clear()
        for key, value in provenance.parameters().items():
            response.parameters[key].string_param = value
        return response.SerializeToString()

    def _schedule_restart(self, model: ManagedModel) -> float:
        """Restart from the same sealed copies after an exponential backoff (caller holds model.lock)."""
        model.failures += 1
        first, longest = self.config.workers.restart_backoff_s
        delay = min(first * 2 ** (model.failures - 1), longest)
        timer = threading.Timer(delay, self._restart, args=(model, model.generation))
        timer.daemon = True
        timer.start()
        return delay

    def _restart(self, model: ManagedModel, generation: int) -> None:
        with model.lock:
            # The sealed memfds still hold the verified bytes: no re-verification needed.
            if self.stopped.is_set() or model.generation != generation or model.verified is None:
                return
            self.metrics.worker_restart(model.config.name, model.version)
            try:
                self._start_worker(model)
            except ModelUnavailable as exc:
                delay = self._schedule_restart(model)
                log.warning("restart of %s failed: %s; next try in %g s", model.config.name, exc, delay)

    def _stop_worker(self, model: ManagedModel, state: State, reason: str) -> None:
        model.generation += 1
        worker = model.worker
        model.set_state(state, reason, worker=None, metadata=None)
        if worker is not None:
            worker.kill()
        if model.verified is not None:
            model.verified.close()
            model.verified = None

    def unload(self, name: str) -> None:
        model = self.get(name)
        with model.lock:
            self._stop_worker(model, State.UNLOADED, "unloaded")
        self.audit.event("model_unload", model=name)

    # -- the narrow interface the public server uses
    def names(self) -> list[str]:
        return sorted(self.models)

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
            status, worker, _ = model.snapshot()
            cgroup = getattr(getattr(worker, "sandboxed", None), "cgroup", None)
            if cgroup is not None:
                found.append((name, status.version, cgroup))
        return found

    async def infer(self, name: str, request: bytes) -> bytes:
        """Forward one ModelInferRequest's bytes to the model's worker; runs on the server's event loop.
        The answer is the worker's bytes with the supervisor's provenance appended (provenance.py).

        The caller holds the model's turn (one call at a time reaches a worker), so the
        inference timeout measures the model, not a queue. Every failure leaves as an
        errors.ClientError with a fixed, sealbox-made text: the model's reason under the view
        lock, never the transport's text, a path or a pid."""
        model = self.get(name)
        status, worker, _ = model.snapshot()
        hop = worker.hop() if worker is not None and status.state == State.READY else None
        if hop is None:
            raise errors.unavailable(name, _reason(status))
        timeout = worker.profile.infer_timeout_s
        try:
            response = await hop.infer(request, timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = f"inference timed out after {timeout:g} s; worker killed"
                self.audit.event("infer_timeout", model=name, reason=reason)
                worker.sandboxed.kill()  # the watcher reports it and restarts with backoff
                raise errors.unavailable(name, reason) from None
            if code in errors.TRANSPORT_CODES:
                raise errors.unavailable(name, await self._failure_reason(model, worker)) from None
            raise errors.from_worker_rpc_error(name, exc, None, timeout) from None
        except (OSError, ValueError, RuntimeError, grpc.RpcError):  # a channel closed under us, say
            raise errors.unavailable(name, await self._failure_reason(model, worker)) from None
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise   # this call itself was cancelled
            # grpc.aio cancels the calls of a channel being closed (the worker was stopped under
            # us): that is an answer for the client, not a cancellation of its call.
            raise errors.unavailable(name, await self._failure_reason(model, worker)) from None
        model.failures = 0  # it served: the next death starts the backoff afresh
        try:
            check_complete(response)   # nothing in it can swallow the stamp appended below
        except PeekError:
            raise errors.ClientError(grpc.StatusCode.INTERNAL, f"model '{name}' failed") from None
        return response + worker.stamp   # the supervisor's provenance: the last map entries win

    async def _failure_reason(self, model: ManagedModel, worker: WorkerProcess) -> str:
        """Why the hop failed, in the supervisor's words: the watcher's reason once it has seen the
        death (waited for briefly: the connection often breaks a moment before the exit is reaped)."""
        for _ in range(40):
            status, current, _ = model.snapshot()
            if current is not worker:
                return _reason(status)
            if worker.proc.returncode is not None:
                return f"worker {describe_exit(worker.proc.returncode)}"
            await asyncio.sleep(0.005)
        return "worker connection failed"

    def ready(self) -> bool:
        return self.initial_load_done.is_set() and not self.stopped.is_set()

    def shutdown(self) -> None:
        self.stopped.set()
        for model in self.models.values():
            with model.lock:
                try:
                    self._stop_worker(model, State.UNLOADED, "daemon stopped")
                except Exception:  # stop every other model regardless
                    log.exception("model %s: stopping its worker failed", model.config.name)


def _reason(status: ModelStatus) -> str:
    """A model's reason for not answering; never "ready" (a READY snapshot without a worker is a restart)."""
    if status.state == State.READY:
        return "worker restarting"
    return status.reason or status.state.value.lower()
