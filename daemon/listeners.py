"""Listeners: one grpc.aio.Server per listener, all in one event loop.

Why one server per listener: grpc.aio's context.peer() is the literal "unix:" for every Unix
socket (measured, grpcio 1.85.3), and an interceptor only sees the method name and metadata,
so a server with two Unix sockets cannot tell them apart.  One server per listener makes the
listener the identity (its interceptor is built with its ListenerSpec).

Binding (measured facts, grpcio 1.85.3):
* grpc.aio.Server.add_insecure_port / add_secure_port bind at once and RAISE RuntimeError when
  NO address could be bound ("Failed to bind to address ..."); the sync server returns 0.
* With a host NAME ("localhost:P") gRPC resolves to [::1] and 127.0.0.1 and succeeds when only
  ONE of them binds (just an INFO "WARNING: Only 1 addresses added out of total 2") - the
  squatter on the other family then gets some clients.  Hence: IP literals only.
* With the default grpc.so_reuseport=1 a second server (same uid) on the same port binds fine
  and the kernel splits connections; with ("grpc.so_reuseport", 0) the bind fails.
* 127.0.0.1:P is bound as a dual-stack socket ([::ffff:127.0.0.1]:P); a squatter on
  127.0.0.1:P (AF_INET) makes it fail, as it should.

Unix sockets: gRPC creates the socket file with the process umask.  Changing the umask is
process-wide (racy in a daemon with threads), so instead the socket is bound inside a fresh
0700 directory next to the final path, chmod/chown'ed there, and rename()d onto the final path
after the server started (atomic; a stale socket file is replaced; a LIVE one - another
sealboxd answering on it - makes start fail).  The parent directory must not be writable by
anyone but root, or another user could rename his own socket over ours.
"""
from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import logging
import os
import socket
import stat
import tempfile
from typing import Mapping

import grpc

from . import roles as R
from .admission import Admission, Limits
from .call_audit import CallAudit, current_caller
from .errors import ClientError, denied

log = logging.getLogger("sealboxd")
INTERNAL_TEXT = "sealbox internal error (see the daemon log)"


class BindError(RuntimeError):
    """A configured address could not be bound: the daemon must refuse to start."""


class ListenerError(ValueError):
    """A listener's settings are refused (config.py adds the file and the key)."""


@dataclasses.dataclass(frozen=True)
class ListenerSpec:
    name: str
    kind: str                                   # "unix" | "tcp"
    address: str                                # socket path, or "IP:port" / "[IPv6]:port"
    roles: frozenset[str]                       # granted to anyone who reaches this listener
    # unix
    mode: int = 0o600
    owner: int = 0
    group: int = 0
    # tcp
    tls_cert: bytes | None = None               # server cert chain (PEM)
    tls_key: bytes | None = None
    client_ca: bytes | None = None              # set -> mutual TLS, require_client_auth=True
    identity_roles: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    # uids whose /dev/shm objects a caller on this listener may register (daemon/shared_memory.py);
    # empty: no shared memory on this listener
    shm_owners: frozenset[int] = frozenset()

    @property
    def transport(self) -> str:
        if self.kind == "unix":
            return "unix"
        return "mtls" if self.client_ca else ("tls" if self.tls_cert else "tcp")

    def validate(self) -> None:
        unknown = (self.roles | {r for rs in self.identity_roles.values() for r in rs}) - R.ALL_ROLES
        if unknown:
            raise ListenerError(f"listener {self.name}: unknown roles {sorted(unknown)}")
        if self.kind == "unix":
            if not os.path.isabs(self.address):
                raise ListenerError(f"listener {self.name}: socket path must be absolute")
            if self.identity_roles:
                raise ListenerError(f"listener {self.name}: identities need mutual TLS")
            return
        if self.kind != "tcp":
            raise ListenerError(f"listener {self.name}: kind must be unix or tcp")
        ip, _port = parse_ip_port(self.address)
        if not ip.is_loopback and not self.tls_cert:
            raise ListenerError(f"listener {self.name}: a non-loopback TCP address requires TLS")
        if bool(self.tls_cert) != bool(self.tls_key) or (self.client_ca and not self.tls_cert):
            raise ListenerError(f"listener {self.name}: tls_cert and tls_key go together; client_ca needs them")
        if not self.client_ca:
            if self.identity_roles:
                raise ListenerError(f"listener {self.name}: identities need client_ca (mutual TLS)")
            if self.roles - {R.HEALTH, R.METADATA, R.INFERENCE}:
                raise ListenerError(f"listener {self.name}: TCP without mutual TLS is inference-only")
        elif R.MODEL_REPOSITORY in self.roles:
            raise ListenerError(f"listener {self.name}: model-repository over TCP only for a mapped identity")


def parse_ip_port(address: str) -> tuple[ipaddress._BaseAddress, int]:
    """'127.0.0.1:8001' or '[::1]:8001' -> (ip, port).  Host names are refused."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ListenerError(f"{address!r}: expected IP:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ListenerError(f"{address!r}: only IP literals, no host names") from None
    if ip.version == 6 and not address.startswith("["):
        raise ListenerError(f"{address!r}: write IPv6 addresses as [addr]:port")
    return ip, int(port)


# ---- authorization ---------------------------------------------------------------------------------
def _wrap(handler: grpc.RpcMethodHandler, guard, read_unary):
    """A copy of `handler` whose behavior first runs `guard(context)` around the original behavior:
    its `check()` (the role; returns the caller), then, entered as a context manager, its lane. Works
    for all four RPC kinds, for behaviors that are coroutines (return / context.write) or async
    generators (yield).

    A method whose request is one message (unary_unary, unary_stream) is served as its request-streaming
    twin (stream_unary, stream_stream): gRPC reads a unary request, up to the message limit, before the
    behavior starts, and a request-streaming behavior reads it itself. So the role check runs before a
    byte of the request is read, `read_unary(context, deserializer, caller key)` (Admission.read_unary)
    then reads it under its per-caller bounds, and only then is the lane entered (a call that never sends
    its message holds no lane). On the wire both are the same: the client sends one message and
    half-closes."""
    unary_request = bool(handler.unary_unary or handler.unary_stream)
    if handler.unary_unary:
        behavior, factory = handler.unary_unary, grpc.stream_unary_rpc_method_handler
    elif handler.unary_stream:
        behavior, factory = handler.unary_stream, grpc.stream_stream_rpc_method_handler
    elif handler.stream_unary:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    else:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    deserializer = handler.request_deserializer

    async def admitted(request, context):
        """The role checked, the request (read now for a unary-request method), the lane entered; a
        ClientError on the way aborts the call."""
        g = guard(context)
        caller = g.check()
        if unary_request:
            request = await read_unary(context, deserializer, caller.key)
        g.__enter__()
        return g, request

    # A refusal (ClientError) becomes `await context.abort(...)` (grpc.aio's abort is a coroutine and
    # must be the one raising: grpc.aio asserts the AbortError it catches is the one abort() made).
    # An unexpected exception in a handler would reach the client as "Unexpected <class>: <text>":
    # it is logged here and the client gets a fixed INTERNAL text instead.
    method = getattr(behavior, "__qualname__", "?")
    if inspect.isasyncgenfunction(behavior):
        async def wrapped(request, context):
            try:
                g, request = await admitted(request, context)
            except ClientError as e:
                await context.abort(e.code, e.message)
            failed = False
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("internal error in %s", method)
                failed = True
            finally:
                g.__exit__(None, None, None)
            if failed:
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_TEXT)
    else:
        async def wrapped(request, context):
            try:
                g, request = await admitted(request, context)
            except ClientError as e:
                await context.abort(e.code, e.message)
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("internal error in %s", method)
            finally:
                g.__exit__(None, None, None)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_TEXT)
    return factory(wrapped, request_deserializer=None if unary_request else deserializer,
                   response_serializer=handler.response_serializer)


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Per-listener: default-deny role check, control-lane admission, caller into a contextvar.

    An aio interceptor sees only the method name and metadata, not the auth context, so the check
    itself runs in the wrapped behavior (first thing, before any request is read for streams)."""

    def __init__(self, spec: ListenerSpec, admission: Admission, audit: CallAudit):
        self.spec, self.admission, self.audit = spec, admission, audit
        # method -> (its handler, the guarded copy): built once per method, not once per call
        self._guarded: dict[str, tuple] = {}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:       # unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = details.method
        known = self._guarded.get(method)
        if known is None or known[0] is not handler:
            known = self._guarded[method] = (handler, self._guard(method, handler))
        return known[1]

    def _guard(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        role = R.role_for(method)
        spec, admission, audit = self.spec, self.admission, self.audit

        class _Guard:
            def __init__(self, context):
                self.context = context
                self.lane = self.caller = None

            def check(self):
                """The caller, if its role admits the method; ClientError otherwise."""
                caller = R.caller_from_context(self.context, spec.name, spec.transport, spec.roles,
                                               spec.identity_roles)
                current_caller.set(caller)
                if role is None or role not in caller.roles:
                    audit.denied(caller, method, role)
                    raise denied(method, role)
                self.caller = caller
                return caller

            def __enter__(self):
                if method in R.CONTROL_STREAMS:
                    self.lane = admission.inference_call(self.caller.key, stream=True)
                    self.lane.__enter__()
                elif role in R.CONTROL_ROLES:
                    self.lane = admission.control_call()
                    self.lane.__enter__()
                return self.caller

            def __exit__(self, *exc):
                if self.lane is not None:
                    self.lane.__exit__(*exc)
                return False

        return _wrap(handler, _Guard, admission.read_unary)


# ---- building and binding ---------------------------------------------------------------------------
def _check_socket_parent(path: str) -> None:
    parent = os.path.dirname(path)
    st = os.stat(parent)
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if os.geteuid() == 0:   # in tests as non-root we skip this
            raise BindError(f"{parent}: must be owned by root and not writable by group/others")


def _socket_is_live(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Listener:
    """One grpc.aio.Server for one ListenerSpec."""

    def __init__(self, spec: ListenerSpec, limits: Limits, admission: Admission, audit: CallAudit,
                 add_handlers):
        spec.validate()
        self.spec = spec
        self.server = grpc.aio.server(
            options=limits.server_options(),
            maximum_concurrent_rpcs=limits.maximum_concurrent_rpcs(),
            interceptors=[AccessInterceptor(spec, admission, audit)])
        add_handlers(self.server)
        self._tmpdir: str | None = None
        self._placed = False      # our socket is at spec.address (only then does stop() remove it)
        self.bound: str | None = None

    def bind(self) -> str:
        """Bind now (before start); raises BindError. Returns the bound address."""
        spec = self.spec
        if spec.kind == "unix":
            os.makedirs(os.path.dirname(spec.address) or ".", mode=0o755, exist_ok=True)
            _check_socket_parent(spec.address)
            if os.path.exists(spec.address) and _socket_is_live(spec.address):
                raise BindError(f"{spec.address}: another daemon is listening there")
            self._tmpdir = tempfile.mkdtemp(prefix=".bind-", dir=os.path.dirname(spec.address))  # 0700
            tmp = os.path.join(self._tmpdir, "s")
            try:
                self.server.add_insecure_port(f"unix:{tmp}")
            except RuntimeError as e:
                raise BindError(f"{spec.address}: cannot listen ({e.__class__.__name__})") from None
            os.chown(tmp, spec.owner, spec.group)
            os.chmod(tmp, spec.mode)
            self.bound = spec.address
            return spec.address
        ip, port = parse_ip_port(spec.address)
        target = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        try:
            if spec.tls_cert:
                creds = grpc.ssl_server_credentials([(spec.tls_key, spec.tls_cert)],
                                                    root_certificates=spec.client_ca,
                                                    require_client_auth=bool(spec.client_ca))
                got = self.server.add_secure_port(target, creds)
            else:
                got = self.server.add_insecure_port(target)
        except RuntimeError:
            raise BindError(f"{target}: address in use or not bindable") from None
        if got == 0 or (port and got != port):
            raise BindError(f"{target}: bound {got} instead")
        self.bound = f"[{ip}]:{got}" if ip.version == 6 else f"{ip}:{got}"
        return self.bound

    async def start(self):
        await self.server.start()
        if self.spec.kind == "unix":
            os.rename(os.path.join(self._tmpdir, "s"), self.spec.address)   # atomic, keeps mode/owner
            self._placed = True
            os.rmdir(self._tmpdir)
            self._tmpdir = None

    async def stop(self, grace: float | None):
        await self.server.stop(grace)
        if self.spec.kind == "unix":
            if self._placed:
                self._placed = False
                with _suppress():
                    os.unlink(self.spec.address)
            if self._tmpdir:
                with _suppress():
                    os.unlink(os.path.join(self._tmpdir, "s"))
                    os.rmdir(self._tmpdir)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


async def start_all(specs: list[ListenerSpec], limits: Limits, admission: Admission, audit: CallAudit,
                    add_handlers) -> list[Listener]:
    """Bind every listener first (all-or-nothing), then start them.  Any BindError -> nothing runs."""
    listeners = [Listener(s, limits, admission, audit, add_handlers) for s in specs]
    try:
        for listener in listeners:
            listener.bind()
        for listener in listeners:
            await listener.start()
    except BaseException:
        for listener in listeners:
            await listener.stop(None)
        raise
    return listeners
