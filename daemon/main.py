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

from sealbox.daemon.audit import AuditLog
from sealbox.daemon.config import ConfigError, load_config


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
    return parser.parse_args(argv)


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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="sealboxd %(levelname)s %(message)s", stream=sys.stderr)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"sealboxd: config refused: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"sealboxd: {args.config}: OK ({len(config.models)} models)")
        return 0

    from sealbox.daemon.server import SERVICE, build_server
    from sealbox.daemon.supervisor import Supervisor

    # Verification holds a descriptor per model file and one sealed memfd per file while loaded.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    audit = AuditLog(config.server.audit_log, config.server.audit_stderr)
    supervisor = Supervisor(config, audit)
    try:
        preflight = supervisor.preflight()
    except Exception as exc:  # a required sandbox layer is missing: start no worker
        print(f"sealboxd: {exc}", file=sys.stderr)
        return 3
    for line in preflight:
        logging.warning("%s", line)
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
    audit.event("daemon_start", config=config.path, listen=addresses, models=sorted(config.models))
    logging.info("listening on %s", ", ".join(addresses))

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    loader = threading.Thread(target=supervisor.load_all, daemon=True, name="initial-load")
    loader.start()

    def mark_serving():
        supervisor.initial_load_done.wait()
        for service in ("", SERVICE):
            health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        logging.info("ready: %s", ", ".join(f"{n}={m.state.value}" for n, m in supervisor.models.items()))
    threading.Thread(target=mark_serving, daemon=True).start()

    stop.wait()
    logging.info("stopping")
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=2).wait()  # no RPC (a load, say) runs on after this
    supervisor.shutdown()
    audit.event("daemon_stop")
    audit.close()
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
