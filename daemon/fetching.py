"""Remote models for the supervisor: fetched into the store by the sandboxed helper, then verified there.

One fetch per model at a time (a second load of a model being fetched is refused, not queued), at
most FETCH_SLOTS fetches at once for the whole daemon, each bounded by its model's fetch_timeout_s,
so neither a model-repository caller nor start-up can make the daemon fetch without bound. Start-up
and reload loads wait in line for a slot (the wait counts against fetch_timeout_s, so start-up is
not held longer); a repository-API load finding every slot taken is refused at once. The
network client runs in the fetch helper (sealbox.transfer.sandboxed); this process only hashes,
bounds and stores. Every fetch is audited: location, TLS peer, bytes, digests, verdict.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ..sandbox.profile import SandboxProfile
from ..transfer.fetch import fetch_model, store_policy
from ..transfer.sandboxed import SandboxedTransport
from ..transfer.store import Store
from ..trust import TrustPolicy, VerificationError
from .config import Config, ModelConfig

FETCH_SLOTS = 2
PROGRESS_EVERY_S = 0.5


class FetchBusy(Exception):
    """This model is being fetched already, or every fetch slot stays taken: refused, not queued."""


class Fetcher:
    def __init__(self, config: Config, audit):
        self.config, self.audit = config, audit
        self.slots = threading.BoundedSemaphore(FETCH_SLOTS)
        self.lock = threading.Lock()
        self.active: set[str] = set()
        self.holds: dict[str, tuple[str, int]] = {}   # model -> (view, lock fd) while it serves from it
        self._store: Store | None = None

    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.config.server.state_dir)
        return self._store

    def profile(self) -> SandboxProfile:
        w = self.config.workers
        return SandboxProfile.for_fetch_helper(python=w.python, seccomp=w.seccomp, landlock=w.landlock,
                                               cgroups=w.cgroups)

    def fetch(self, cfg: ModelConfig, progress: Callable[[str], None], wait: bool = False) -> tuple[str, TrustPolicy]:
        """Fetches cfg.source into the store; returns the view and the policy to verify it with.
        wait: in line for a slot (start-up, reload), else refused at once if none is free (the
        repository API). Raises VerificationError (refused, a timeout included) or FetchBusy."""
        with self.lock:
            if cfg.name in self.active:
                raise FetchBusy(f"model '{cfg.name}' is being fetched already")
            self.active.add(cfg.name)
        try:
            started = time.monotonic()
            if not self.slots.acquire(blocking=False):
                if not wait:
                    raise FetchBusy(f"{FETCH_SLOTS} fetches are in progress; try again later")
                progress(f"waiting to fetch {cfg.source}: {FETCH_SLOTS} fetches are in progress")
                if not self.slots.acquire(timeout=cfg.fetch_timeout_s):
                    reason = (f"no fetch slot came free within its fetch_timeout_s {cfg.fetch_timeout_s:g} s "
                              f"({FETCH_SLOTS} fetches at once)")
                    self.audit.event("model_fetch", model=cfg.name, location=cfg.source, bytes=0, verdict="refused",
                                     reason=f"{cfg.source}: transfer: {reason}", check="transfer")
                    raise VerificationError(cfg.source, "transfer", reason)
            try:
                return self._fetch(cfg, progress, started)
            finally:
                self.slots.release()
        finally:
            with self.lock:
                self.active.discard(cfg.name)

    def _fetch(self, cfg: ModelConfig, progress: Callable[[str], None], started: float) -> tuple[str, TrustPolicy]:
        store = self.store()
        record = {"model": cfg.name, "location": cfg.source}
        received, last = 0, 0.0

        def advance(name: str, n: int, _size) -> None:
            nonlocal received, last
            received += n
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                progress(f"fetching {cfg.source}: {received / 2**20:.1f} MiB received ({name})")

        progress(f"fetching {cfg.source}: the signature")
        transport = None
        try:
            transport = SandboxedTransport(cfg.source, cfg.policy.source_urls, self.profile(),
                                           os.path.join(self.config.server.run_dir, "fetch"), cfg.source_ca,
                                           read_timeout=min(30.0, cfg.fetch_timeout_s), ssh_key=cfg.ssh_key,
                                           known_hosts=cfg.known_hosts)
            got = fetch_model(cfg.name, cfg.source, cfg.policy, store, transport, self.config.server.state_dir,
                              advance, timeout_s=cfg.fetch_timeout_s, started=started)
        except VerificationError as exc:
            self.audit.event("model_fetch", **record, peer=getattr(transport, "peer", None), bytes=received,
                             verdict="refused", reason=str(exc), check=exc.check)
            raise
        except OSError as exc:   # the CA bundle, the run dir, the store
            reason = f"{cfg.source}: io: {exc.strerror or exc}"
            self.audit.event("model_fetch", **record, bytes=received, verdict="refused", reason=reason, check="io")
            raise VerificationError(cfg.source, "io", str(exc.strerror or exc)) from None
        finally:
            if transport is not None:
                transport.close()
        self.audit.event("model_fetch", **record, peer=got.peer, bytes=got.downloaded, digest=got.signed.digest,
                         files={n: f"sha256:{d}" for n, d in sorted(got.files.items())}, reused=sorted(got.reused),
                         view=got.view, verdict="accepted")
        return got.view, store_policy(cfg.policy, store)

    def hold(self, name: str, view: str) -> None:
        """The model now serves from `view`: gc keeps it (and its blobs) until release."""
        fd = self.store().hold(name, view)
        with self.lock:
            old = self.holds.pop(name, None)
            self.holds[name] = (view, fd)
        if old is not None:
            os.close(old[1])

    def release(self, name: str) -> None:
        with self.lock:
            old = self.holds.pop(name, None)
        if old is not None:
            os.close(old[1])
