"""sealboxd: the sealbox supervisor daemon."""
from __future__ import annotations

import os

# The daemon forks workers while gRPC threads run; its fork handlers only add noise and risk.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse  # noqa: E402
import asyncio
import logging  # noqa: E402
import sys

from .admission import tune_malloc
from .audit import AuditLog
from .call_audit import CallAudit
from .config import ConfigError, load_config


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="sealboxd",
        description="Verify models against the trust policy, load each in its own sandboxed worker, "
                    "and serve them over the Open Inference Protocol (gRPC): inference on the Unix socket "
                    "[server] socket (and optional TCP listeners), model loading and unloading only on the "
                    "admin socket [server] admin_socket (root-only by default) or over mutual TLS.",
        epilog="Runs as root (it drops each worker to the configured worker user). Refuses to start if any "
               "configured listener cannot be bound. Stop with SIGTERM or Ctrl-C: every worker is stopped with it.")
    parser.add_argument("--config", required=True, metavar="FILE", help="TOML config (see README: Configuration)")
    parser.add_argument("--check-config", action="store_true", help="parse and check the config, then exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log what workers print on stderr (always kept for death reasons)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    # First, before any big allocation: freed request buffers go back to the OS (admission.py).
    tune_malloc()
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

    from .server import serve
    from .supervisor import Supervisor

    # Verification holds a descriptor per model file and one sealed memfd per file while loaded.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Events written while a call is handled carry the caller's identity (call_audit.py).
    audit = CallAudit(AuditLog(config.server.audit_log, config.server.audit_stderr))
    supervisor = Supervisor(config, audit)
    try:
        preflight = supervisor.preflight()
    except Exception as exc:  # a required sandbox layer is missing: start no worker
        print(f"sealboxd: {exc}", file=sys.stderr)
        return 3
    for line in preflight:
        logging.warning("%s", line)
    status = asyncio.run(serve(supervisor, audit))   # the public server: grpc.aio, this thread's loop
    if status == 0:
        audit.event("daemon_stop")
    audit.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
