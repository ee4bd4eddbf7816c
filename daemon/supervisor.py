"""The supervisor: one sandboxed worker per model, its state, and the calls proxied to it.

Data flows one way: a load request is checked against the trust policy and
verified (sealbox.daemon.verify), the verified bytes (sealed memfds) are
handed to a freshly launched sandboxed worker, and inference requests are
forwarded to that worker as untouched bytes.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import logging
import os
import queue
import shutil
import signal
import threading
import time

import grpc

from sealbox.daemon.audit import AuditLog
from sealbox.daemon.config import Config, ModelConfig
from sealbox.proto import inference_pb2 as pb
from sealbox.proto import message_options
from sealbox.sandbox import launcher
from sealbox.sandbox.profile import SOCKET_NAME, SandboxProfile, find_openblas

log = logging.getLogger("sealboxd")

EXIT_REASONS = {2: "bad worker spec", 3: "model refused by the engine", 4: "sandbox confinement failed"}


class State(str, enum.Enum):
    UNLOADED = "UNLOADED"
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


class ModelUnavailable(Exception):
    """The model cannot answer now (loading, crashed, unloaded): gRPC UNAVAILABLE."""


class LoadRefused(Exception):
    """Verification refused the model: gRPC PERMISSION_DENIED. Nothing was handed to a worker."""


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


WORKER_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 5), ("grpc.min_reconnect_backoff_ms", 5),
                    ("grpc.max_reconnect_backoff_ms", 100)]


def _identity(x):
    return x


class Worker:
    """One running sandboxed worker process and the channel to it."""

    def __init__(self, name: str, profile: SandboxProfile, socket_dir: str, sandboxed: launcher.SandboxedWorker,
                 max_message_bytes: int):
        self.name, self.profile, self.socket_dir = name, profile, socket_dir
        self.sandboxed, self.proc = sandboxed, sandboxed.proc
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.stopping = False
        self.ready_at: float | None = None
        # One call at a time reaches the worker (it has one engine thread): the inference
        # deadline then measures the model, not the queue in front of it.
        self.busy = threading.Semaphore(1)
        # The socket appears a few ms after spawn: retry quickly instead of gRPC's 1 s backoff.
        opts = [*message_options(max_message_bytes), *WORKER_RECONNECT]
        self.channel = grpc.insecure_channel(f"unix:{os.path.join(socket_dir, SOCKET_NAME)}", options=opts)
        self.infer_raw = self.channel.unary_unary("/sealbox.worker.Worker/Infer",
                                                  request_serializer=_identity, response_deserializer=_identity)
        self.describe = self.channel.unary_unary("/sealbox.worker.Worker/Describe",
                                                 request_serializer=_identity,
                                                 response_deserializer=pb.ModelMetadataResponse.FromString)
        self._stderr_reader = threading.Thread(target=self._drain_stderr, name=f"stderr-{name}", daemon=True)
        self._stderr_reader.start()

    def _drain_stderr(self):
        # Bounded reads: a hostile worker writing without newlines must not grow the supervisor.
        for line in iter(lambda: self.proc.stderr.readline(4096), b""):
            text = line.decode("utf-8", "replace").rstrip()
            self.stderr_tail.append(text)
            log.debug("worker %s: %s", self.name, text)

    def wait_ready(self, timeout: float) -> pb.ModelMetadataResponse:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ModelUnavailable(self.death_reason("while loading"))
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ModelUnavailable(f"load timed out after {timeout:g} s; worker killed")
            try:
                return self.describe(b"", timeout=min(left, 0.25), wait_for_ready=True)
            except grpc.RpcError:
                continue

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
        last = [line for line in self.stderr_tail if line.startswith("sealbox worker:")]
        if last and self.ready_at is None:  # while loading: what it was parsing, or why it refused
            reason += ": " + last[-1].removeprefix("sealbox worker: ")
        return reason

    def kill(self):
        self.stopping = True
        self.sandboxed.stop()
        self.channel.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@dataclasses.dataclass
class ManagedModel:
    config: ModelConfig
    state: State = State.UNLOADED
    reason: str = ""
    version: str = ""
    metadata: pb.ModelMetadataResponse | None = None
    worker: Worker | None = None
    verified: object = None   # sealbox.daemon.verify.VerifiedModel while loaded
    failures: int = 0
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    generation: int = 0

    def describe_state(self) -> str:
        """The state as clients see it: model 'x' is unavailable: reason."""
        return f"model '{self.config.name}' is {self.state.value.lower()}" + (f": {self.reason}" if self.reason else "")


class Supervisor:
    def __init__(self, config: Config, audit: AuditLog):
        self.config, self.audit = config, audit
        self.models = {name: ManagedModel(cfg) for name, cfg in config.models.items()}
        self.spawner = Spawner()
        self.stopped = threading.Event()
        self.initial_load_done = threading.Event()
        openblas = find_openblas() if config.workers.openblas else None
        self.preload = (openblas,) if openblas else ()

    # -- profile: the one place a model's confinement is decided
    def profile_for(self, model: ModelConfig) -> SandboxProfile:
        w = self.config.workers
        extra_ro, extra_env = (), ()
        if model.format == "julia":  # Julia's installation and depot, read-only; nothing downloaded
            julia_root = os.path.dirname(os.path.dirname(os.path.realpath(w.julia))) if w.julia else None
            extra_ro = tuple(p for p in (julia_root, w.julia_depot) if p)
            extra_env = tuple((k, v) for k, v in (("PYTHON_JULIAPKG_EXE", w.julia),
                                                 ("JULIA_DEPOT_PATH", w.julia_depot)) if v)
        return SandboxProfile(engine=model.format, worker_user=w.user, python=w.python,
                              extra_ro_paths=extra_ro, extra_env=extra_env,
                              memory_bytes=model.memory_bytes or w.memory_bytes,
                              pids_max=model.pids_max or w.pids_max,
                              load_timeout_s=model.load_timeout_s or w.load_timeout_s,
                              infer_timeout_s=model.infer_timeout_s or w.infer_timeout_s,
                              seccomp=w.seccomp, landlock=w.landlock, cgroups=w.cgroups,
                              preload=self.preload, max_message_bytes=self.config.server.max_message_bytes)

    def preflight(self) -> list[str]:
        """Refuse to run if workers cannot be sandboxed as configured; return warnings to log."""
        import subprocess

        w = self.config.workers
        profile = SandboxProfile(engine="mlx", worker_user=w.user, python=w.python)
        launcher.bwrap_path()
        uid, gid = launcher.worker_identity(profile)
        try:
            probe = subprocess.run([w.python, "-c", "import sealbox.worker.main"], user=uid, group=gid,
                                   extra_groups=[], capture_output=True, env={"PATH": "/usr/bin:/bin"}, cwd="/")
            failure = probe.stderr.decode(errors="replace").strip().splitlines()[-1:] if probe.returncode else None
        except OSError as exc:
            failure = [exc.strerror]
        if failure is not None:
            raise launcher.SandboxUnavailable(
                f"runtime: the worker user {w.user!r} cannot run {w.python} with sealbox installed "
                f"({(failure or ['no output'])[0]}); use a Python outside root's home, "
                "e.g. a venv made from /usr/bin/python3")
        from sealbox.sandbox import hostcheck
        report = hostcheck.host_report()
        details = {"namespaces": report["namespaces"].get("detail", ""),
                   "worker_uid": f"worker user {w.user!r}",
                   "seccomp": report["seccomp"]["detail"],
                   "landlock": f"Landlock ABI {report['landlock']['abi']} (needs 6: TCP denial and scopes)",
                   "cgroups": f"memory via {report['cgroups']['memory']}, pids via {report['cgroups']['pids']}"}
        required = ["namespaces", "worker_uid"] + [layer for layer in ("seccomp", "landlock", "cgroups")
                                                   if getattr(w, layer)]
        for layer in required:
            if not report["layers"][layer]:
                raise launcher.SandboxUnavailable(
                    f"sandbox layer {layer} is required but unavailable on this host ({details[layer]}); "
                    f"no worker is started. To run without it, set [workers] {layer} = false in {self.config.path}")
        warnings = [] if self.preload or not w.openblas else [
            "[workers] openblas = true but Debian's OpenBLAS (libopenblas0-pthread) is not installed: "
            "workers use MLX's bundled reference BLAS, which is much slower"]
        return warnings + [f"sandbox layer {layer} is disabled by [workers] {layer} = false in {self.config.path}: "
                "workers run without it" for layer in ("seccomp", "landlock", "cgroups") if not getattr(w, layer)]

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
            model.state, model.reason = State.UNAVAILABLE, f"internal error while loading: {exc!r}"

    def load(self, name: str) -> None:
        """Verify, launch, wait until ready. Raises LoadRefused or ModelUnavailable."""
        from sealbox.daemon.verify import VerificationError, verify_model

        model = self.get(name)
        with model.lock:
            if self.stopped.is_set():
                raise ModelUnavailable("the daemon is stopping")
            cfg = model.config
            try:
                verified = verify_model(name, cfg.path, cfg.policy, self.config.server.state_dir, self.audit)
            except VerificationError as exc:
                reason = f"verification refused: {exc}"
                if model.state != State.READY:  # a refused reload leaves a serving model serving
                    model.state, model.reason = State.UNAVAILABLE, reason
                raise LoadRefused(reason) from None
            self._stop_worker(model, State.LOADING, "loading")
            model.verified, model.version, model.failures = verified, verified.version or "", 0
            try:
                self._start_worker(model)
            except ModelUnavailable:
                model.verified.close()  # never served: free the sealed copies now
                model.verified = None
                raise

    def _start_worker(self, model: ManagedModel) -> None:
        """Launch a worker on model.verified and wait until it serves (caller holds model.lock)."""
        if self.stopped.is_set():
            raise ModelUnavailable("the daemon is stopping")
        profile = self.profile_for(model.config)
        name = model.config.name
        model.generation += 1
        generation = model.generation
        socket_dir = None
        try:
            # The pid keeps two daemons sharing a run_dir out of each other's way.
            socket_dir = launcher.make_socket_dir(self.config.server.run_dir,
                                                  f"{os.getpid()}-{name}-{generation}", profile)
            sandboxed = self.spawner.call(lambda: launcher.launch(profile, socket_dir, model.verified.files))
        except Exception as exc:  # SandboxUnavailable, OSError, SubprocessError from a failed preexec
            if socket_dir:
                shutil.rmtree(socket_dir, ignore_errors=True)
            model.worker, model.state, model.reason = None, State.UNAVAILABLE, f"sandbox unavailable: {exc}"
            self.audit.event("worker_start", model=name, verdict="refused", reason=model.reason)
            raise ModelUnavailable(model.reason) from None
        worker = Worker(name, profile, socket_dir, sandboxed, self.config.server.max_message_bytes)
        model.worker, model.state, model.reason = worker, State.LOADING, "loading"
        try:
            model.metadata = worker.wait_ready(profile.load_timeout_s)
        except ModelUnavailable as exc:
            worker.kill()
            model.worker, model.state, model.reason = None, State.UNAVAILABLE, str(exc)
            self.audit.event("model_load", model=name, verdict="failed", reason=model.reason)
            raise
        model.state, model.reason, worker.ready_at = State.READY, "", time.monotonic()
        self.audit.event("model_load", model=name, verdict="ready", version=model.version,
                         engine=model.config.format, worker_pid=sandboxed.proc.pid)
        threading.Thread(target=self._watch, args=(model, worker, generation), daemon=True,
                         name=f"watch-{name}").start()

    STABLE_S = 60.0  # a worker that served this long before dying starts the backoff afresh

    def _watch(self, model: ManagedModel, worker: Worker, generation: int) -> None:
        worker.proc.wait()
        if worker.stopping or self.stopped.is_set():
            return
        try:
            reason = worker.death_reason("while serving")
            with model.lock:
                if model.generation != generation:
                    return
                worker.kill()
                model.worker, model.state, model.reason = None, State.UNAVAILABLE, reason
                if worker.ready_at is not None and time.monotonic() - worker.ready_at > self.STABLE_S:
                    model.failures = 0
                delay = self._schedule_restart(model)
            self.audit.event("worker_died", model=model.config.name, reason=reason, restart_in_s=delay)
        except Exception:  # the watcher must not die silently and leave a dead worker looking READY
            log.exception("model %s: handling the worker's death failed", model.config.name)
            with model.lock:
                if model.generation == generation:
                    model.state, model.reason = State.UNAVAILABLE, "worker died; see the daemon log"

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
            try:
                self._start_worker(model)
            except ModelUnavailable as exc:
                delay = self._schedule_restart(model)
                log.warning("restart of %s failed: %s; next try in %g s", model.config.name, exc, delay)

    def _stop_worker(self, model: ManagedModel, state: State, reason: str) -> None:
        model.generation += 1
        if model.worker is not None:
            model.worker.kill()
            model.worker = None
        if model.verified is not None:
            model.verified.close()
            model.verified = None
        model.state, model.reason, model.metadata = state, reason, None

    def unload(self, name: str) -> None:
        model = self.get(name)
        with model.lock:
            self._stop_worker(model, State.UNLOADED, "unloaded")
        self.audit.event("model_unload", model=name)

    def infer_raw(self, name: str, request: bytes) -> bytes:
        model = self.get(name)
        worker = model.worker
        if model.state != State.READY or worker is None:
            raise ModelUnavailable(model.describe_state())
        timeout = worker.profile.infer_timeout_s
        if not worker.busy.acquire(timeout=timeout):
            raise ModelUnavailable(f"model '{name}' is busy: no turn within {timeout:g} s")
        try:
            return worker.infer_raw(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = f"inference timed out after {worker.profile.infer_timeout_s:g} s; worker killed"
                self.audit.event("infer_timeout", model=name, reason=reason)
                worker.sandboxed.kill()  # the watcher reports it and restarts with backoff
                raise ModelUnavailable(f"model '{name}': {reason}") from None
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL) \
                    and worker.proc.poll() is not None:
                raise ModelUnavailable(f"model '{name}': worker {describe_exit(worker.proc.returncode)}") from None
            raise
        except ValueError:  # grpc: the channel was closed under us while the worker is replaced
            raise ModelUnavailable(f"model '{name}': worker {model.reason or 'stopped'}") from None
        finally:
            worker.busy.release()

    def shutdown(self) -> None:
        self.stopped.set()
        for model in self.models.values():
            with model.lock:
                try:
                    self._stop_worker(model, State.UNLOADED, "daemon stopped")
                except Exception:  # stop every other model regardless
                    log.exception("model %s: stopping its worker failed", model.config.name)
