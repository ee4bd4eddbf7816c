"""sealboxd: the sealbox supervisor daemon."""
from __future__ import annotations

import os

# The daemon forks workers while gRPC threads run; its fork handlers only add noise and risk.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from .. import __version__  # noqa: E402
from . import logs  # noqa: E402
from .admission import tune_malloc  # noqa: E402
from .audit import AuditLog  # noqa: E402
from .call_audit import CallAudit  # noqa: E402
from .config import ConfigError, load_config  # noqa: E402
from .notify import Notifier  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="sealboxd",
        description="Verify models against the trust policy, load each in its own sandboxed worker, "
                    "and serve them over the Open Inference Protocol (gRPC): inference on the Unix socket "
                    "[server] socket (and optional TCP listeners), model loading and unloading only on the "
                    "admin socket [server] admin_socket (root-only by default) or over mutual TLS.",
        epilog="Runs as root (it drops each worker to the configured worker user). Refuses to start if any "
               "configured listener cannot be bound. Stop with SIGTERM or Ctrl-C: every worker is stopped "
               "with it. SIGHUP reopens the audit log and the log file (logrotate) and reloads the config without "
               "downtime: models added are loaded, removed ones unloaded, changed ones verified again and "
               "handed over to a new worker while the old one serves; an invalid config is logged and the "
               "running one kept; [server] changes need a restart.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", required=True, metavar="FILE", help="TOML config (see README: Configuration)")
    parser.add_argument("--check-config", action="store_true",
                        help="parse and check the config without starting a worker, then exit (0 OK, 2 a "
                             "problem; each named with its key, path and check): model directories exist "
                             "inside the policy's sources, key and certificate files readable, state_dir owned "
                             "by root with mode 0700 (created so when absent), run and log directories "
                             "creatable, the worker user exists and is not root, and can execute the "
                             "worker python")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log what workers print on stderr (always kept for death reasons)")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text",
                        help="operational log lines as text (default) or one JSON object per line")
    parser.add_argument("--log-file", metavar="FILE",
                        help="also write the operational log to FILE (reopened on SIGHUP); audit events "
                             "always go to [server] audit_log only")
    return parser.parse_args(argv)


def _health_check(socket_path: str):
    """The watchdog's probe: the daemon's own gRPC server answers ServerLive within 5 s. Liveness,
    not readiness: a model that is not READY makes the server not ready (strict_readiness), and
    restarting the daemon would not help it."""
    import grpc
    from ..proto import inference_pb2 as pb
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                               request_serializer=pb.ServerLiveRequest.SerializeToString,
                               response_deserializer=pb.ServerLiveResponse.FromString)

    def check() -> bool:
        return live(pb.ServerLiveRequest(), timeout=5).live
    return check


class ServiceHooks:
    """What the service manager and the operator see at each step of the server's life
    (server.serve calls these): sd_notify, log reopening on SIGHUP, the watchdog."""

    def __init__(self, notifier: Notifier, audit: AuditLog, socket_path: str, reload=None):
        self.notifier, self.audit, self.socket_path = notifier, audit, socket_path
        self.reload = reload   # Supervisor.reload_file: re-read and apply the config
        self.ready_once = threading.Event()
        self.stop = threading.Event()

    def ready(self, states: str) -> None:
        self.notifier.ready(f"serving: {states}" if states else "serving, no models")
        self.ready_once.set()
        self.notifier.start_watchdog(self.stop, _health_check(self.socket_path))

    def sighup(self) -> None:
        """SIGHUP: reopen the audit log and the log file (logrotate's convention), then reload the
        config (Supervisor.reload_file: a bad config is logged and the running one kept). Runs on a
        thread, never in the signal handler."""
        if self.ready_once.is_set():
            self.notifier.reloading()
        self.audit.reopen()
        logs.reopen()
        logging.info("SIGHUP: reopened the audit log and the log file")
        outcome = "reopened logs"
        if self.reload is not None:
            outcome += ", config reloaded" if self.reload() else ", config reload refused (see the log)"
        if self.ready_once.is_set():
            self.notifier.ready(outcome)

    def stopping(self) -> None:
        self.stop.set()
        self.notifier.stopping()


def main(argv=None) -> int:
    # First, before any big allocation: freed request buffers go back to the OS (admission.py).
    tune_malloc()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0 and not args.check_config:
        print(f"sealboxd: must run as root (uid 0), not uid {os.geteuid()}: it drops each worker to the "
              "unprivileged worker user itself (--check-config works as any user)", file=sys.stderr)
        return 2
    notifier = Notifier.from_environ()  # read (and removed from the environment) before anything starts
    try:
        logs.setup(args.log_format, logging.DEBUG if args.verbose else logging.INFO, file=args.log_file)
    except OSError as exc:
        print(f"sealboxd: cannot open the log file: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"sealboxd: config refused: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        from .preflight import check_config
        problems = check_config(config, args.log_file)
        for line in problems:
            print(f"sealboxd: check failed: {line}", file=sys.stderr)
        if problems:
            return 2
        print(f"sealboxd: {args.config}: OK ({len(config.models)} models)")
        return 0

    from .metrics import Metrics
    from .server import serve
    from .supervisor import Supervisor

    # Verification holds a descriptor per model file and one sealed memfd per file while loaded.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    audit_log = AuditLog(config.server.audit_log)
    if config.server.audit_stderr:
        logging.warning("[server] audit_stderr is ignored: audit events go only to %s", config.server.audit_log)
    # Events written while a call is handled carry the caller's identity (call_audit.py).
    audit = CallAudit(audit_log)
    metrics = Metrics()
    supervisor = Supervisor(config, audit, metrics)
    metrics.watch_supervisor(supervisor)
    try:
        preflight = supervisor.preflight()
    except Exception as exc:  # a required sandbox layer is missing: start no worker
        print(f"sealboxd: {exc}", file=sys.stderr)
        return 3
    for line in preflight:
        logging.warning("%s", line)
    if config.workers.cgroups:
        from ..sandbox.cgroups import CgroupError, prepare_delegated_subtree
        try:
            delegated = prepare_delegated_subtree()
            if delegated["moved"]:
                logging.info("cgroups: moved into %s/supervisor; workers go to %s/sealbox",
                             delegated["base"].rstrip("/"), delegated["base"].rstrip("/"))
        except (CgroupError, OSError) as exc:  # each worker start reports it again, as its reason
            logging.error("%s", exc)
    from .preflight import clean_leftovers
    for path in clean_leftovers(config):   # a daemon that died: its worker directories and cgroups
        logging.warning("removed %s, left behind by a daemon that is gone", path)
    metrics_server = None
    if config.server.metrics:
        try:
            metrics_server = metrics.serve(config.server.metrics, config.server.socket_mode)
        except OSError as exc:
            print(f"sealboxd: metrics listener {config.server.metrics}: {exc}", file=sys.stderr)
            return 2
        logging.info("metrics on %s", metrics_server.address)
    hooks = ServiceHooks(notifier, audit_log, config.server.socket, reload=supervisor.reload_file)
    try:
        status = asyncio.run(serve(supervisor, audit, hooks))   # the public server: grpc.aio, this thread's loop
    finally:
        if metrics_server is not None:
            metrics_server.close()
    if status == 0:
        audit.event("daemon_stop")
    audit.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
