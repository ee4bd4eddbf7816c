"""sealboxd: the sealbox supervisor daemon."""
from __future__ import annotations

import os

# The daemon forks workers while gRPC threads run; its fork handlers only add noise and risk.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse  # noqa: E402
import logging  # noqa: E402
import signal
import sys
import threading

from grpc_health.v1 import health_pb2

from sealbox.daemon import logs
from sealbox.daemon.audit import AuditLog
from sealbox.daemon.config import ConfigError, load_config
from sealbox.daemon.notify import Notifier


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="sealboxd",
        description="Verify models against the trust policy, load each in its own sandboxed worker, "
                    "and serve them over the Open Inference Protocol (gRPC) on a Unix socket.",
        epilog="Runs as root (it drops each worker to the configured worker user). "
               "Stop with SIGTERM or Ctrl-C: every worker is stopped with it.")
    parser.add_argument("--config", required=True, metavar="FILE", help="TOML config (see README: Configuration)")
    parser.add_argument("--check-config", action="store_true", help="parse and check the config, then exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log what workers print on stderr (always kept for death reasons)")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text",
                        help="operational log lines as text (default) or one JSON object per line")
    parser.add_argument("--log-file", metavar="FILE",
                        help="also write the operational log to FILE (reopened on SIGHUP); audit events "
                             "always go to [server] audit_log only")
    return parser.parse_args(argv)


def on_sighup(audit: AuditLog, notifier: Notifier, ready: threading.Event) -> None:
    """SIGHUP: reopen the audit log and the log file (logrotate's convention).

    The hook for a configuration reload: it runs on its own thread (never in the
    signal handler), between RELOADING=1 and READY=1 once the daemon has been ready."""
    if ready.is_set():
        notifier.reloading()
    audit.reopen()
    logs.reopen()
    logging.info("SIGHUP: reopened the audit log and the log file")
    if ready.is_set():
        notifier.ready("reopened logs")


def _health_check(socket_path: str):
    """The watchdog's probe: the daemon's own gRPC health service answers SERVING within 5 s."""
    import grpc
    from grpc_health.v1 import health_pb2_grpc
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    stub = health_pb2_grpc.HealthStub(channel)

    def check() -> bool:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return answer.status == health_pb2.HealthCheckResponse.SERVING
    return check


def _answers(socket_path: str) -> bool:
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(socket_path)
            return True
        except OSError:
            return False


def main(argv=None) -> int:
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
        print(f"sealboxd: {args.config}: OK ({len(config.models)} models)")
        return 0

    from sealbox.daemon.metrics import Metrics
    from sealbox.daemon.server import SERVICE, build_server
    from sealbox.daemon.supervisor import Supervisor

    # Verification holds a descriptor per model file and one sealed memfd per file while loaded.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    audit = AuditLog(config.server.audit_log)
    if config.server.audit_stderr:
        logging.warning("[server] audit_stderr is ignored: audit events go only to %s", config.server.audit_log)
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
        from sealbox.sandbox.cgroups import CgroupError, prepare_delegated_subtree
        try:
            delegated = prepare_delegated_subtree()
            if delegated["moved"]:
                logging.info("cgroups: moved into %s/supervisor; workers go to %s/sealbox",
                             delegated["base"].rstrip("/"), delegated["base"].rstrip("/"))
        except (CgroupError, OSError) as exc:  # each worker start reports it again, as its reason
            logging.error("%s", exc)
    socket_path = config.server.socket
    os.makedirs(os.path.dirname(socket_path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(socket_path):
        if _answers(socket_path):
            print(f"sealboxd: {socket_path}: another daemon is listening there", file=sys.stderr)
            return 2
        os.unlink(socket_path)  # a stale socket from a daemon that is gone
    old_umask = os.umask(0o177)  # the socket is born private, then opened up to socket_mode
    try:
        server, health_servicer, addresses = build_server(supervisor)
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, config.server.socket_mode)  # anyone who can open the socket can call the API
    metrics_server = None
    if config.server.metrics:
        try:
            metrics_server = metrics.serve(config.server.metrics, config.server.socket_mode)
        except OSError as exc:
            print(f"sealboxd: metrics listener {config.server.metrics}: {exc}", file=sys.stderr)
            server.stop(grace=0)
            return 2
        logging.info("metrics on %s", metrics_server.address)
    audit.event("daemon_start", config=config.path, listen=addresses, models=sorted(config.models))
    logging.info("listening on %s", ", ".join(addresses))

    stop, hup, ready = threading.Event(), threading.Event(), threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())  # handled on a thread, never in the handler

    def sighups():
        while hup.wait() and not stop.is_set():
            hup.clear()
            try:
                on_sighup(audit, notifier, ready)
            except Exception:
                logging.exception("SIGHUP handling failed")
    threading.Thread(target=sighups, daemon=True, name="sighup").start()
    loader = threading.Thread(target=supervisor.load_all, daemon=True, name="initial-load")
    loader.start()

    def mark_serving():
        supervisor.initial_load_done.wait()
        for service in ("", SERVICE):
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        states = ", ".join(f"{n}={m.state.value}" for n, m in supervisor.models.items())
        logging.info("ready: %s", states)
        if not stop.is_set():
            notifier.ready(f"serving: {states}" if states else "serving, no models")
            ready.set()
            notifier.start_watchdog(stop, _health_check(socket_path))
    threading.Thread(target=mark_serving, daemon=True).start()

    stop.wait()
    notifier.stopping()
    hup.set()  # let the SIGHUP thread finish
    logging.info("stopping")
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=2).wait()  # no RPC (a load, say) runs on after this
    supervisor.shutdown()
    if metrics_server is not None:
        metrics_server.close()
    audit.event("daemon_stop")
    audit.close()
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
