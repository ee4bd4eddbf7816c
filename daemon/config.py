"""The daemon's TOML configuration: parsed once, checked strictly, errors name file and key.

    [server]
    socket = "/run/sealbox/sealbox.sock"   # the inference socket: roles health, metadata, inference
    socket_mode = "0660"                   # who may call: the socket's owner (root) and group
    socket_group = "mlusers"               # optional: the socket's group (name or gid; default root)
    admin_socket = "/run/sealbox/admin.sock"   # every role, model-repository (load/unload/index)
    admin_socket_mode = "0600"             #   included; default: admin.sock next to `socket`, 0600
    tcp = "127.0.0.1:8001"                 # optional: an inference-only listener, loopback IP literal
    max_message_mb = 256                   # gRPC message limit, every hop
    shared_memory_owners = ["alice"]       # optional: users whose /dev/shm regions callers of the
                                           #   inference socket may register (Triton's system shared
                                           #   memory); also a key of each [[server.listeners]]

    [[server.listeners]]                   # optional extra listeners (see SECURITY.md: Who may call what)
    name = "team-a"                        # a Unix socket:
    socket = "/run/sealbox/team-a.sock"
    mode = "0660"
    group = "team-a"
    roles = ["health", "metadata", "inference"]     # the default

    [[server.listeners]]                   # TCP: an IP literal ("[::1]:8443"), never a host name;
    name = "mtls"                          #   off loopback only with TLS; without client_ca
    address = "0.0.0.0:8443"               #   (mutual TLS) only health/metadata/inference
    tls_cert = "/etc/sealbox/tls/server.pem"
    tls_key = "/etc/sealbox/tls/server.key"
    client_ca = "/etc/sealbox/tls/clients-ca.pem"   # client certificates must chain to this CA
    roles = ["health"]                     # what every verified client may do
    [server.listeners.identities]          # certificate identity -> extra roles:
    "cn:alice" = ["metadata", "inference", "model-repository"]   # cn:, subject:, email:, uri:, dns:

    [server.limits]                        # bounded cost (RESOURCE_EXHAUSTED beyond; defaults shown)
    inference_rpcs = 8                     # ModelInfer calls in flight, all callers (before the read)
    streams = 16                           # open ModelStreamInfer streams, all callers
    per_caller_rpcs = 32                   # per caller: a listener, or a certificate subject on mTLS
    inflight_mb = 1024                     # request bytes held, all models
    model_inflight_mb = 512                # request bytes held, per model
    model_inflight = 2                     # calls at a model's worker at once (pipelined, taken in order)
    model_queue = 4                        # calls waiting for a busy model (beyond: refused at once)
    model_queue_timeout_s = 30
    control_rpcs = 64                      # health, metadata and admin calls (their own lane)
    stream_idle_s = 30                     # an idle stream ends with DEADLINE_EXCEEDED
    read_timeout_s = 30                    # to receive an admitted request's message
    max_streams_per_connection = 16
    max_connections = 256                  # per listener
    state_dir = "/var/lib/sealbox"         # accepted versions (rollback protection)
    run_dir = "/run/sealbox/workers"       # one socket directory per worker
    audit_log = "/var/log/sealbox/audit.jsonl"   # audit events go here only (default shown)
    audit_stderr = false                   # deprecated, ignored: audit never shares stderr with the log
    metrics = "127.0.0.1:8002"             # optional Prometheus /metrics: loopback IP:port or unix:/path
    strict_readiness = true                # ServerReady and health: only while every load = true model
                                           #   is READY (Triton's --strict-readiness); false: once loaded

    [workers]
    user = "sealbox-worker"
    python = "/opt/sealbox/venv/bin/python"
    memory_mb = 2048
    pids_max = 64
    load_timeout_s = 60
    infer_timeout_s = 30
    restart_backoff_s = [0.5, 30]           # first and longest delay
    seccomp = true                          # layers: turning one off is explicit and logged
    landlock = true
    cgroups = true
    openblas = true                         # preload Debian's OpenBLAS into workers (MLX's own BLAS is slow)
    julia = "/opt/julia/bin/julia"          # only for format = "julia" (untested here: no Julia)
    julia_depot = "/var/lib/sealbox/julia"  # with BSON, Flux and PythonCall installed; bound read-only
    instances = 1                           # sandboxed workers per model (at most 16; per-model key too)
    warm_pool = 0                           # pre-started, confined workers kept per engine (0: off, at most
                                            #   16), each waiting for one model's fds: a load skips the spawn;
                                            #   used for exactly one model, never returned; read at start
    early_start = true                      # with warm_pool = 0: a load starts its worker while the model is
                                            #   verified; the model's fds reach it only once verified

    [policy]                                # the default trust policy (see SECURITY.md)
    ...

    [models.NAME]
    path = "/srv/models/NAME"
    # or, instead of path: fetched into the store under state_dir (sealbox.transfer), then verified
    # source = "https://models.example.com/NAME/"   # under the policy's sources URL prefixes
    # source_ca = "/etc/sealbox/models-ca.pem"       # optional: trust only this CA for its TLS
    # (source = "oci://REGISTRY/REPO:TAG" or "sftp://USER@HOST/PATH/" with ssh_key and known_hosts)
    # fetch_timeout_s = 600                          # the whole fetch (start-up READY is not held longer)
    format = "mlx"                          # mlx | flux | julia | mlx-lm
    load = true                             # load at start
    memory_mb = 512                         # optional per-model overrides of [workers]:
    pids_max = 32                           #   memory_mb, pids_max, load_timeout_s, infer_timeout_s
    max_prompt_tokens = 4096                # format = "mlx-lm" only: generation limits (defaults shown);
    max_new_tokens = 512                    #   request_time_s is its per-request time budget and
    request_time_s = 120                    #   replaces infer_timeout_s (refused for these models)
    instances = 2                           # this model's workers: each its own sandbox and cgroup, all on
                                            #   the same sealed copies (verified once); calls go to the
                                            #   least-loaded one; memory_mb and pids_max are per instance
    max_batch_size = 32                     # dynamic batching (off by default): concurrent requests are run
    max_queue_delay_us = 500                #   as one engine call of at most 32 rows and split back, inside
    preferred_batch_sizes = [8, 16, 32]     #   the worker; every input and output needs -1 as its first dim
    [models.NAME.policy]                    # overrides of the default policy
"""
from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import sys
import tomllib
from typing import Any
from urllib.parse import urlsplit

from ..proto.contract import ENGINE_NAMES, Batching
from ..trust.policy import SigstoreRoot, TrustedKey, TrustedRoots, TrustPolicy, normalize_identity, parse_version
from . import roles as R
from .admission import Limits
from .listeners import ListenerError, ListenerSpec, parse_ip_port


class ConfigError(Exception):
    """A malformed config: the message names the file and the key."""


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


INFERENCE_ROLES = frozenset({R.HEALTH, R.METADATA, R.INFERENCE})
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    socket: str = "/run/sealbox/sealbox.sock"
    socket_mode: int = 0o660
    socket_group: int | None = None
    admin_socket: str = "/run/sealbox/admin.sock"
    admin_socket_mode: int = 0o600
    tcp: str | None = None
    listeners: tuple[ListenerSpec, ...] = ()   # every listener, admin and inference socket included
    limits: Limits = Limits()
    max_message_bytes: int = 256 * 2**20
    state_dir: str = "/var/lib/sealbox"
    run_dir: str = "/run/sealbox/workers"
    audit_log: str | None = "/var/log/sealbox/audit.jsonl"
    audit_stderr: bool = False   # deprecated: accepted, ignored (the daemon warns)
    metrics: str | None = None   # Prometheus listener, see daemon/metrics.py; off by default
    strict_readiness: bool = True   # ServerReady/health only while every load = true model is READY


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    user: str = "sealbox-worker"
    python: str = sys.executable
    memory_bytes: int = 2048 * 2**20
    pids_max: int = 64
    load_timeout_s: float = 60.0
    infer_timeout_s: float = 30.0
    restart_backoff_s: tuple[float, float] = (0.5, 30.0)
    seccomp: bool = True
    landlock: bool = True
    cgroups: bool = True
    openblas: bool = True
    julia: str | None = None          # the Julia executable for format = "julia" (bound read-only)
    julia_depot: str | None = None    # its depot with BSON, Flux and PythonCall installed
    instances: int = 1                # default sandboxed workers per model (per-model key `instances`)
    warm_pool: int = 0                # pre-started workers kept per worker profile (0: off)
    early_start: bool = True          # warm_pool = 0: start a load's worker while verifying (warm_pool.EarlyStart)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    path: str
    format: str
    load: bool = True
    policy: TrustPolicy = TrustPolicy()   # the built-in defaults trust nothing
    # Per-model overrides of [workers]; None = the [workers] value.
    memory_bytes: int | None = None
    pids_max: int | None = None
    load_timeout_s: float | None = None
    infer_timeout_s: float | None = None
    # A remote model (instead of `path`): fetched into the store under state_dir, then verified there.
    source: str | None = None
    source_ca: str | None = None       # a pinned CA bundle for the source's TLS (default: the system CAs)
    fetch_timeout_s: float = 600.0
    ssh_key: str | None = None         # sftp:// only: the private key (key authentication only)
    known_hosts: str | None = None     # sftp:// only: the pinned host key(s); no trust on first use
    # format = "mlx-lm" only: its generation limits (max_prompt_tokens, max_new_tokens, request_time_s),
    # given to the worker's engine; request_time_s replaces infer_timeout_s for such a model.
    engine_options: tuple[tuple[str, float], ...] = ()
    instances: int = 1   # sandboxed workers serving it, each its own sandbox and cgroup ([workers] default)
    batching: Batching | None = None   # dynamic batching (max_batch_size > 0), done inside the worker


# The limits an mlx-lm model may set in its table, and their kinds (defaults: worker/llm_engine.py).
LLM_LIMITS = {"max_prompt_tokens": int, "max_new_tokens": int, "request_time_s": (int, float)}


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    workers: WorkerConfig
    models: dict[str, ModelConfig]
    default_policy: TrustPolicy = TrustPolicy()


class _Table:
    """Typed access to one TOML table; every error names the file and the key."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be a table")
        self.data, self.where, self.used = data, where, set()

    def get(self, key: str, kind, default):
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.where}: key '{key}' must be {names}, not {type(value).__name__}")
        return value

    def positive(self, key: str, default, kind=(int, float)):
        value = self.get(key, kind, default)
        if value is not None and value <= 0:
            raise ConfigError(f"{self.where}: key '{key}' must be positive, not {value}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key '{unknown[0]}'")


def _mode(table: _Table, key: str, default: int) -> int:
    mode = table.get(key, str, oct(default)[2:])
    if not re.fullmatch(r"0?[0-7]{3}", mode):
        raise ConfigError(f"{table.where}: key '{key}' must be an octal mode such as \"0660\", not {mode!r}")
    return int(mode, 8)


def _group(table: _Table, key: str) -> int | None:
    group = table.get(key, (str, int), None)
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"{table.where}: key '{key}': group {group!r} does not exist") from None


def _owners(table: _Table, key: str) -> frozenset[int]:
    """A list of user names or uids (the shared-memory owners a listener accepts)."""
    uids = set()
    for user in table.get(key, list, []):
        if isinstance(user, int) and not isinstance(user, bool) and user >= 0:
            uids.add(user)
            continue
        try:
            uids.add(pwd.getpwnam(user).pw_uid)
        except (KeyError, TypeError):
            raise ConfigError(f"{table.where}: key '{key}': {user!r} is not a user name or uid on this host") from None
    return frozenset(uids)


def _roles(table: _Table, key: str, default: frozenset[str]) -> frozenset[str]:
    roles = table.get(key, list, None)
    if roles is None:
        return default
    unknown = [r for r in roles if r not in R.ALL_ROLES]
    if unknown:
        raise ConfigError(f"{table.where}: key '{key}': unknown role {unknown[0]!r}"
                          f" (roles: {', '.join(sorted(R.ALL_ROLES))})")
    return frozenset(roles)


def _read_pem(table: _Table, key: str) -> bytes | None:
    path = table.get(key, str, None)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{table.where}: key '{key}': cannot read {path}: {exc.strerror}") from None


def _tcp_address(table: _Table, key: str, address: str, loopback_only: bool) -> None:
    try:
        ip, _port = parse_ip_port(address)
    except ListenerError:
        raise ConfigError(f"{table.where}: key '{key}' must be an IP literal with a port, such as"
                          f" \"127.0.0.1:8001\" or \"[::1]:8001\" (no host names such as 'localhost'),"
                          f" not {address!r}") from None
    if loopback_only and not ip.is_loopback:
        raise ConfigError(f"{table.where}: key '{key}' must be a loopback address with a port, not {address!r}")


def _listener(table: _Table, index: int) -> ListenerSpec:
    name = table.get("name", str, f"listener{index}")
    socket_path, address = table.get("socket", str, None), table.get("address", str, None)
    if (socket_path is None) == (address is None):
        raise ConfigError(f"{table.where}: exactly one of the keys 'socket' (Unix) and 'address' (TCP) is required")
    roles = _roles(table, "roles", INFERENCE_ROLES)
    if socket_path is not None:
        spec = ListenerSpec(name, "unix", socket_path, roles, mode=_mode(table, "mode", 0o660),
                            group=_group(table, "group") or 0, shm_owners=_owners(table, "shared_memory_owners"))
    else:
        _tcp_address(table, "address", address, loopback_only=False)
        identities = _Table(table.get("identities", dict, {}), f"{table.where}.identities")
        identity_roles = {}
        for ident in identities.data:
            if not re.fullmatch(r"(cn|subject|email|uri|dns):.+", ident):
                raise ConfigError(f"{identities.where}: key {ident!r} must be cn:, subject:, email:, uri: or dns:"
                                  " followed by the certificate's value")
            identity_roles[ident] = _roles(identities, ident, frozenset())
        spec = ListenerSpec(name, "tcp", address, roles, tls_cert=_read_pem(table, "tls_cert"),
                            tls_key=_read_pem(table, "tls_key"), client_ca=_read_pem(table, "client_ca"),
                            identity_roles=identity_roles, shm_owners=_owners(table, "shared_memory_owners"))
    table.finish()
    return spec


def _limits(table: _Table, max_message_bytes: int) -> Limits:
    d = Limits()
    count = lambda key, default: table.positive(key, default, int)  # noqa: E731
    limits = Limits(
        max_message_bytes=max_message_bytes,
        inference_rpcs=count("inference_rpcs", d.inference_rpcs), streams=count("streams", d.streams),
        per_caller_rpcs=count("per_caller_rpcs", d.per_caller_rpcs),
        inflight_bytes=int(table.positive("inflight_mb", d.inflight_bytes / MiB) * MiB),
        model_bytes=int(table.positive("model_inflight_mb", d.model_bytes / MiB) * MiB),
        model_concurrency=count("model_inflight", d.model_concurrency),
        model_queue=table.get("model_queue", int, d.model_queue),
        model_queue_timeout_s=float(table.positive("model_queue_timeout_s", d.model_queue_timeout_s)),
        control_rpcs=count("control_rpcs", d.control_rpcs),
        stream_idle_s=float(table.positive("stream_idle_s", d.stream_idle_s)),
        read_timeout_s=float(table.positive("read_timeout_s", d.read_timeout_s)),
        max_streams_per_connection=count("max_streams_per_connection", d.max_streams_per_connection),
        max_connections=count("max_connections", d.max_connections))
    if limits.model_queue < 0 or limits.model_queue + limits.model_concurrency >= limits.inference_rpcs:
        raise ConfigError(f"{table.where}: key 'model_queue' must be at least 0 and below inference_rpcs - "
                          f"model_inflight ({limits.inference_rpcs - limits.model_concurrency - 1}), so that a hung "
                          "model cannot hold every inference slot")
    table.finish()
    return limits


def _server(table: _Table) -> ServerConfig:
    d = ServerConfig()
    tcp = table.get("tcp", str, None)
    if tcp is not None:
        _tcp_address(table, "tcp", tcp, loopback_only=True)
    socket_mode = _mode(table, "socket_mode", d.socket_mode)
    socket_path = table.get("socket", str, d.socket)
    admin_socket = table.get("admin_socket", str, os.path.join(os.path.dirname(socket_path), "admin.sock"))
    admin_mode = _mode(table, "admin_socket_mode", d.admin_socket_mode)
    socket_group = _group(table, "socket_group")
    max_mb = table.positive("max_message_mb", d.max_message_bytes / 2**20)
    if max_mb >= 2048:
        raise ConfigError(f"{table.where}: key 'max_message_mb' must be below 2048 (gRPC's limit), not {max_mb}")
    max_message_bytes = int(max_mb * 2**20)
    base = table.where.removesuffix("[server]")
    limits = _limits(_Table(table.get("limits", dict, {}), f"{base}[server.limits]"), max_message_bytes)
    specs = [(ListenerSpec("public", "unix", socket_path, INFERENCE_ROLES, mode=socket_mode, group=socket_group or 0,
                           shm_owners=_owners(table, "shared_memory_owners")), table.where),
             (ListenerSpec("admin", "unix", admin_socket, R.ALL_ROLES, mode=admin_mode), table.where)]
    if tcp is not None:
        specs.append((ListenerSpec("tcp", "tcp", tcp, INFERENCE_ROLES), table.where))
    for i, raw in enumerate(table.get("listeners", list, []), 1):
        where = f"{base}[[server.listeners]] #{i}"
        specs.append((_listener(_Table(raw, where), i), where))
    names, addresses = set(), set()
    for spec, where in specs:
        if spec.name in names or spec.address in addresses:
            raise ConfigError(f"{where}: listener {spec.name!r} ({spec.address}) repeats another listener's"
                              " name or address")
        names.add(spec.name)
        addresses.add(spec.address)
        try:
            spec.validate()
        except ListenerError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    cfg = ServerConfig(
        socket=socket_path, socket_mode=socket_mode, socket_group=socket_group, admin_socket=admin_socket,
        admin_socket_mode=admin_mode, tcp=tcp, listeners=tuple(spec for spec, _ in specs), limits=limits,
        max_message_bytes=max_message_bytes,
        state_dir=table.get("state_dir", str, d.state_dir), run_dir=table.get("run_dir", str, d.run_dir),
        audit_log=table.get("audit_log", str, d.audit_log), audit_stderr=table.get("audit_stderr", bool, d.audit_stderr),
        metrics=_metrics_listen(table), strict_readiness=table.get("strict_readiness", bool, d.strict_readiness))
    table.finish()
    return cfg


def _metrics_listen(table: _Table) -> str | None:
    from .metrics import ListenError, parse_listen
    value = table.get("metrics", str, None)
    if value is not None:
        try:
            parse_listen(value)
        except ListenError as exc:
            raise ConfigError(f"{table.where}: key 'metrics': {exc}") from None
    return value


def _workers(table: _Table) -> WorkerConfig:
    d = WorkerConfig()
    backoff = table.get("restart_backoff_s", list, list(d.restart_backoff_s))
    if len(backoff) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in backoff) \
            or backoff[0] > backoff[1]:
        raise ConfigError(f"{table.where}: key 'restart_backoff_s' must be [first, longest] seconds, first <= longest")
    cfg = WorkerConfig(
        user=table.get("user", str, d.user), python=table.get("python", str, d.python),
        memory_bytes=int(table.positive("memory_mb", d.memory_bytes / 2**20) * 2**20),
        pids_max=table.positive("pids_max", d.pids_max, int),
        load_timeout_s=float(table.positive("load_timeout_s", d.load_timeout_s)),
        infer_timeout_s=float(table.positive("infer_timeout_s", d.infer_timeout_s)),
        restart_backoff_s=(float(backoff[0]), float(backoff[1])),
        seccomp=table.get("seccomp", bool, d.seccomp), landlock=table.get("landlock", bool, d.landlock),
        cgroups=table.get("cgroups", bool, d.cgroups), openblas=table.get("openblas", bool, d.openblas),
        julia=table.get("julia", str, None), julia_depot=table.get("julia_depot", str, None),
        instances=_instances(table, d.instances), warm_pool=_warm_pool(table),
        early_start=table.get("early_start", bool, d.early_start))
    table.finish()
    return cfg


URL_SCHEMES = ("https://", "oci://", "sftp://")   # remote sources (sealbox.transfer)


MAX_INSTANCES = 16


def _instances(table: _Table, default: int) -> int:
    value = table.positive("instances", default, int)
    if value > MAX_INSTANCES:
        raise ConfigError(f"{table.where}: key 'instances' must be at most {MAX_INSTANCES}, not {value}")
    return value


MAX_BATCH_SIZE = 1024


def _warm_pool(table: _Table) -> int:
    value = table.get("warm_pool", int, 0)
    if not 0 <= value <= MAX_INSTANCES:
        raise ConfigError(f"{table.where}: key 'warm_pool' must be 0 (off) to {MAX_INSTANCES}, not {value}")
    return value


def _batching(table: _Table) -> Batching | None:
    """Triton's dynamic_batching: max_batch_size (0 or absent: off), max_queue_delay_us (Triton's
    max_queue_delay_microseconds), preferred_batch_sizes. Whether the model has a batch dimension is
    checked when it loads (the worker refuses it, naming the tensor)."""
    size = table.get("max_batch_size", int, 0)
    delay = table.get("max_queue_delay_us", int, None)
    preferred = table.get("preferred_batch_sizes", list, None)
    if size < 0 or size > MAX_BATCH_SIZE:
        raise ConfigError(f"{table.where}: key 'max_batch_size' must be 0 (off) to {MAX_BATCH_SIZE}, not {size}")
    if size == 0:
        if delay is not None or preferred is not None:
            raise ConfigError(f"{table.where}: keys 'max_queue_delay_us' and 'preferred_batch_sizes' need "
                              "'max_batch_size' (dynamic batching)")
        return None
    if delay is not None and not 0 <= delay <= 10_000_000:
        raise ConfigError(f"{table.where}: key 'max_queue_delay_us' must be 0 to 10000000, not {delay}")
    preferred = preferred or []
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= size for n in preferred):
        raise ConfigError(f"{table.where}: key 'preferred_batch_sizes' must be sizes from 1 to max_batch_size "
                          f"({size}), not {preferred!r}")
    return Batching(size, delay or 0, tuple(sorted(set(preferred))))


def policy_from_toml(table: Any, where: str, defaults: TrustPolicy | None = None, *,
                     one_model: bool = True) -> TrustPolicy:
    """The trust policy of a [policy] or [models.NAME.policy] table; keys absent
    fall back to `defaults`. Every key and file it names is checked now, so a
    broken policy stops the daemon instead of failing open later.
    one_model=False (the default [policy]) refuses the keys that describe one
    model's content (version, manifest_digest).

    Raises ConfigError("<where>: <key>: <problem>").
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    base = defaults or TrustPolicy()
    known = {"sources", "public_keys", "certificates", "sigstore", "require_signature", "signature", "release",
             "ignore_paths", "pinned_files", "pinned_manifest", "min_version", "allow_downgrade",
             "clock_skew_seconds", "max_bytes", "max_files", "version", "manifest_digest", "model_name"}
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: {key}: unknown key (known: {', '.join(sorted(known))})")

    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {msg}")

    def get(key, typ, what):
        value = table[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise err(key, f"must be {what}")
        return value

    def abspath(key: str, value) -> str:
        if not isinstance(value, str) or not os.path.isabs(value):
            raise err(key, f"{value!r} must be an absolute path")
        return value

    changes: dict = {"where": where}
    if "sources" in table:
        dirs, urls = [], []
        for s in get("sources", list, "a list of absolute directories or https://, oci:// or sftp:// URL prefixes"):
            scheme = next((p for p in URL_SCHEMES if isinstance(s, str) and s.startswith(p)), None)
            if scheme and len(s) > len(scheme):
                from ..transfer.fetch import path_problem   # the same comparison the fetch and its redirects use
                parts = urlsplit(s)
                problem = path_problem(s) or ("a URL prefix has no host" if not parts.hostname else None) or (
                    "a URL prefix has no query or fragment" if parts.query or parts.fragment or "#" in s else None)
                if problem:
                    raise err("sources", f"{s!r}: {problem}")
                urls.append(s)
            elif isinstance(s, str) and os.path.isabs(s):
                # Resolved once here; below it a model path is walked with O_NOFOLLOW at verify time.
                dirs.append(os.path.realpath(s))
            else:
                raise err("sources", f"{s!r} is neither an absolute directory nor an https://, oci:// or sftp:// "
                                     "URL prefix (http://, ftp:// and file:// are not secure transfers)")
        changes["sources"], changes["source_urls"] = tuple(dirs), tuple(urls)
    if "public_keys" in table:
        keys = []
        for p in get("public_keys", list, "a list of PEM public key files"):
            p = abspath("public_keys", p)
            try:
                keys.append(TrustedKey.load(p))
            except (OSError, ValueError) as e:
                raise err("public_keys", f"{p}: {e}") from None
        changes["public_keys"] = tuple(keys)
    if "certificates" in table:
        roots = []
        for i, entry in enumerate(get("certificates", list, "an array of tables {roots, identities}")):
            k = f"certificates[{i}]"
            if not isinstance(entry, dict) or set(entry) != {"roots", "identities"}:
                raise err(k, "must be a table with exactly the keys roots and identities")
            path = abspath(k + ".roots", entry["roots"])
            ids = entry["identities"]
            if not isinstance(ids, list) or not ids:
                raise err(k + ".identities", "must be a non-empty list: a certificate signer is always pinned")
            try:
                ids = [normalize_identity(ident) for ident in ids]  # a bare address pins the e-mail SAN
            except ValueError as e:
                raise err(k + ".identities", str(e)) from None
            try:
                root = TrustedRoots.load(path, tuple(ids))
            except (OSError, ValueError) as e:
                raise err(k + ".roots", f"{path}: {e}") from None
            roots.append(root)
        changes["certificates"] = tuple(roots)
    if "sigstore" in table:
        roots = []
        for i, entry in enumerate(get("sigstore", list, "an array of tables {trusted_root, identities, issuer}")):
            k = f"sigstore[{i}]"
            if not isinstance(entry, dict) or set(entry) != {"trusted_root", "identities", "issuer"}:
                raise err(k, "must be a table with exactly the keys trusted_root, identities and issuer")
            path = abspath(k + ".trusted_root", entry["trusted_root"])
            ids, issuer = entry["identities"], entry["issuer"]
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
                raise err(k + ".identities", "must be a non-empty list of e-mail addresses or URIs: a keyless signer is always pinned")
            if not isinstance(issuer, str) or not issuer.startswith("https://"):
                raise err(k + ".issuer", f"{issuer!r} must be the https:// URL of the OIDC issuer")
            try:
                roots.append(SigstoreRoot.load(path, tuple(ids), issuer))
            except (OSError, ValueError) as e:
                raise err(k + ".trusted_root", f"{path}: {e}") from None
        changes["sigstore"] = tuple(roots)
    for key in ("require_signature", "allow_downgrade"):
        if key in table:
            changes[key] = get(key, bool, "true or false")
    for key in ("signature", "release"):
        if key in table:
            value = get(key, str, "a path")
            if not value or (not os.path.isabs(value) and ".." in value.split("/")):
                raise err(key, f"{value!r} must be a file name inside the model directory or an absolute path")
            changes[key] = value
    if "ignore_paths" in table:
        paths = get("ignore_paths", list, "a list of relative names inside the model directory")
        for p in paths:
            if not isinstance(p, str) or not p or p.startswith("/") or ".." in p.split("/"):
                raise err("ignore_paths", f"{p!r} must be a relative name inside the model directory")
        changes["ignore_paths"] = tuple(paths)
    if "pinned_files" in table:
        pins = []
        for name, digest in get("pinned_files", dict, "a table of file name = \"sha256:HEX\"").items():
            if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise err("pinned_files", f"{name}: {digest!r} must be sha256: and 64 lowercase hex digits")
            pins.append((name, digest[len("sha256:"):]))
        changes["pinned_files"] = tuple(sorted(pins))
    if "pinned_manifest" in table:
        changes["pinned_manifest"] = abspath("pinned_manifest", table["pinned_manifest"])
    if "min_version" in table:
        value = get("min_version", str, "a version string")
        try:
            parse_version(value)
        except ValueError as e:
            raise err("min_version", str(e)) from None
        changes["min_version"] = value
    for key in ("version", "manifest_digest", "model_name"):
        if key in table and not one_model:
            raise err(key, "belongs to one model: set it in [models.NAME.policy], not in the default [policy]")
    if "version" in table:
        value = get("version", str, "a version string")
        try:
            parse_version(value)
        except ValueError as e:
            raise err("version", str(e)) from None
        changes["version"] = value
    if "manifest_digest" in table:
        value = get("manifest_digest", str, "a digest string")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
            raise err("manifest_digest", f"{value!r} must be sha256: and 64 lowercase hex digits (what `sealbox verify` prints)")
        changes["manifest_digest"] = value
    if "model_name" in table:
        value = get("model_name", str, "a model name")
        if not value or len(value) > 255 or not value.isprintable():
            raise err("model_name", f"{value!r} must be 1 to 255 printable characters: the name the signature carries")
        changes["model_name"] = value
    if "clock_skew_seconds" in table:
        value = get("clock_skew_seconds", int, "an integer number of seconds")
        if not 0 <= value <= 86400:
            raise err("clock_skew_seconds", "must be between 0 and 86400")
        changes["clock_skew_seconds"] = value
    if "max_bytes" in table:
        value = get("max_bytes", int, "an integer number of bytes")
        if value <= 0:
            raise err("max_bytes", "must be positive")
        changes["max_bytes"] = value
    if "max_files" in table:
        value = get("max_files", int, "an integer number of files")
        if value <= 0:
            raise err("max_files", "must be positive")
        changes["max_files"] = value

    policy = dataclasses.replace(base, **changes)
    # Whole-policy rules, checked on the merged result.
    if policy.require_signature and not (policy.public_keys or policy.certificates or policy.sigstore):
        raise err("require_signature", "is true but none of public_keys, certificates or sigstore is set")
    if not policy.require_signature:
        if (policy.pinned_files is None) == (policy.pinned_manifest is None):
            raise err("require_signature", "is false: exactly one of pinned_files or pinned_manifest must pin the digests")
        if policy.model_name is not None:
            raise err("model_name", "needs a signature (require_signature = true): pinned digests carry no model name")
    if not (policy.sources or policy.source_urls):
        raise err("sources", "is required: the directories models may be loaded from")
    return policy


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    top = _Table(data, path)
    server = _server(_Table(top.get("server", dict, {}), f"{path}: [server]"))
    workers = _workers(_Table(top.get("workers", dict, {}), f"{path}: [workers]"))
    default_policy = policy_from_toml(top.get("policy", dict, {}), f"{path}: [policy]", one_model=False)
    models = {}
    for name, raw in top.get("models", dict, {}).items():
        where = f"{path}: [models.{name}]"
        if not MODEL_NAME.fullmatch(name):
            raise ConfigError(f"{where}: model name must match {MODEL_NAME.pattern}")
        table = _Table(raw, where)
        model_path = table.get("path", str, None)
        source = table.get("source", str, None)
        if (model_path is None) == (source is None):
            raise ConfigError(f"{where}: exactly one of the keys 'path' (a local directory) and 'source' "
                              "(an https://, oci:// or sftp:// location) is required")
        fmt = table.get("format", str, "mlx")
        if fmt not in ENGINE_NAMES:
            raise ConfigError(f"{where}: key 'format' must be one of {sorted(ENGINE_NAMES)}, not {fmt!r}")
        policy = policy_from_toml(table.get("policy", dict, {}), f"{where}.policy", default_policy)
        memory_mb = table.positive("memory_mb", None)
        load_timeout = table.positive("load_timeout_s", None)
        infer_timeout = table.positive("infer_timeout_s", None)
        source_ca = table.get("source_ca", str, None)
        fetch_timeout = table.positive("fetch_timeout_s", None)
        ssh_key, known_hosts = table.get("ssh_key", str, None), table.get("known_hosts", str, None)
        sftp = source is not None and source.startswith("sftp://")
        if sftp and (ssh_key is None or known_hosts is None):
            raise ConfigError(f"{where}: an sftp:// source needs 'ssh_key' (key authentication only) and "
                              "'known_hosts' (the pinned host key; no trust on first use)")
        if not sftp and (ssh_key is not None or known_hosts is not None):
            raise ConfigError(f"{where}: keys 'ssh_key' and 'known_hosts' are for an sftp:// source only")
        for key, value in (("ssh_key", ssh_key), ("known_hosts", known_hosts)):
            if value is not None and not os.path.isabs(value):
                raise ConfigError(f"{where}: key '{key}' must be an absolute path")
        if source is not None:
            from ..transfer.fetch import check_location   # the pipeline's own check, before any connection
            from ..trust import VerificationError
            try:
                source = check_location(source, policy)
            except VerificationError as exc:
                raise ConfigError(f"{where}: key 'source': {exc.detail}") from None
            if os.path.isabs(policy.signature) or os.path.isabs(policy.release):
                raise ConfigError(f"{where}.policy: a fetched model's signature and release are named relative "
                                  "to its source, not absolute paths")
        elif source_ca is not None or fetch_timeout is not None:
            raise ConfigError(f"{where}: keys 'source_ca' and 'fetch_timeout_s' need 'source'")
        if source_ca is not None and not os.path.isabs(source_ca):
            raise ConfigError(f"{where}: key 'source_ca' must be an absolute path")
        engine_options = []
        for key, kind in LLM_LIMITS.items():
            if key in table.data and fmt != "mlx-lm":
                raise ConfigError(f"{where}: key '{key}' is for format = \"mlx-lm\" models only")
            value = table.positive(key, None, kind)
            if value is not None:
                engine_options.append((key, value))
        if fmt == "mlx-lm" and infer_timeout is not None:
            raise ConfigError(f"{where}: key 'infer_timeout_s' does not apply to format = \"mlx-lm\": "
                              "its per-request time budget is 'request_time_s'")
        models[name] = ModelConfig(
            name=name, path=os.path.join(base, model_path) if model_path is not None else "", source=source,
            source_ca=source_ca, fetch_timeout_s=float(fetch_timeout) if fetch_timeout else 600.0,
            ssh_key=ssh_key, known_hosts=known_hosts,
            format=fmt, load=table.get("load", bool, True),
            policy=policy, memory_bytes=int(memory_mb * 2**20) if memory_mb else None,
            pids_max=table.positive("pids_max", None, int),
            load_timeout_s=float(load_timeout) if load_timeout else None,
            infer_timeout_s=float(infer_timeout) if infer_timeout else None, engine_options=tuple(engine_options),
            instances=_instances(table, workers.instances), batching=_batching(table))
        table.finish()
    top.finish()
    return Config(path=os.path.abspath(path), server=server, workers=workers, models=models,
                  default_policy=default_policy)
