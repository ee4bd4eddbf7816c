"""The `sealbox` command line: call a running sealboxd, publish models, inspect the sandbox."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .. import __version__

if TYPE_CHECKING:
    import numpy as np

    from .client import Client

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
# Need no daemon: run without the client's imports (grpc, numpy, protobuf: ~0.15 s of start-up,
# a third of `sealbox verify`'s wall time on a 1 GiB model).
PUBLISHER_COMMANDS = ("keygen", "hash", "sign", "verify")


class UsageError(Exception):
    """Bad arguments or unreadable input files: exit 2."""


def _client(args) -> Client:
    from .client import Client
    return Client(args.target, admin_target=args.admin_target)


def cmd_models(args) -> int:
    with _client(args) as c:
        for m in c.models():
            print(f"{m.name}\t{m.state}\t{m.version or '-'}\t{m.reason}")
    return EXIT_OK


def cmd_status(args) -> int:
    with _client(args) as c:
        m = c.status(args.model)
        print(f"model:   {m.name}\nstate:   {m.state}\nversion: {m.version or '-'}")
        if m.reason:
            print(f"reason:  {m.reason}")
        if m.state == "READY":
            meta = c.metadata(args.model)
            print(f"engine:  {meta.platform}")
            for kind, specs in (("input:", meta.inputs), ("output:", meta.outputs)):
                for t in specs:
                    print(f"{kind:8} {t.name} {t.datatype} {list(t.shape)}")
    return EXIT_OK if m.state == "READY" else EXIT_REFUSED


def _parse_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    import numpy as np
    inputs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"sealbox infer: --input must be NAME=FILE.npy, not {spec!r}")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"sealbox infer: {path}: cannot read as .npy: {exc}") from None
    return inputs


def cmd_infer(args) -> int:
    import numpy as np
    inputs = _parse_inputs(args.input)
    with _client(args) as c:
        outputs = c.infer(args.model, inputs, args.output or None)
    for name, array in outputs.items():
        if args.output_dir:
            path = os.path.join(args.output_dir, f"{name}.npy")
            np.save(path, array)
            print(f"{name}: {array.dtype} {list(array.shape)} -> {path}")
        else:
            print(f"{name}: {array.dtype} {list(array.shape)}\n{array}")
    return EXIT_OK


def cmd_generate(args) -> int:
    """Tokens to the terminal as they come; a closed pipe or Ctrl-C cancels the call (generation stops)."""
    with _client(args) as c:
        for piece in c.generate(args.model, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed, stop=args.stop or None, timeout=args.timeout):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return EXIT_OK


def cmd_load(args) -> int:
    with _client(args) as c:
        c.load(args.model)
    print(f"{args.model}: loaded")
    return EXIT_OK


def cmd_unload(args) -> int:
    with _client(args) as c:
        c.unload(args.model)
    print(f"{args.model}: unloaded")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.dir, once=args.once)


def cmd_scan(args) -> int:
    from ..sandbox.tools import scan_file
    return scan_file(args.file, as_json=args.json)


def cmd_sandbox_check(args) -> int:
    from ..sandbox import hostcheck
    import json
    report = hostcheck.host_report()
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else hostcheck.format_report(report))
    return EXIT_OK


def cmd_sandbox_run_python(args) -> int:
    from ..sandbox.tools import run_python
    return run_python(args.script, args.args, engine=args.engine, memory=args.memory)


def build_parser() -> argparse.ArgumentParser:
    from .client import DEFAULT_ADMIN_TARGET, DEFAULT_TARGET
    parser = argparse.ArgumentParser(
        prog="sealbox",
        description="Call a running sealboxd, publish and verify signed models, and inspect the worker sandbox.",
        epilog=f"The daemon is reached at --target (default {DEFAULT_TARGET}; set SEALBOX_TARGET to change it) "
               "for inference and metadata, and at --admin-target for models, status, load and unload "
               "(default: $SEALBOX_ADMIN_TARGET, else admin.sock next to a unix: --target, else "
               f"{DEFAULT_ADMIN_TARGET}; root-only by default). "
               "Exit status: 0 success, 1 refused (verification, scan, or a server error), 2 usage or I/O error.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--target", default=DEFAULT_TARGET,
                        help="gRPC target of sealboxd: unix:/path/to.sock or 127.0.0.1:PORT")
    parser.add_argument("--admin-target", default=None,
                        help="gRPC target of sealboxd's admin socket, for models/status/load/unload "
                             "(env SEALBOX_ADMIN_TARGET; default: admin.sock next to a unix: --target)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the models, their state and why a model is not ready (admin target)",
                       description="List every configured model, one line each: name, state (READY, LOADING, "
                                   "FETCHING, UNAVAILABLE, UNLOADED), version ('-' without a signed release) and the reason "
                                   "a model is not ready. Asks the admin socket (--admin-target).")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("status", help="state, version, engine and tensors of one model (admin target); "
                       "exit status 1 unless it is READY",
                       description="One model's state, version and reason (admin socket); when it is READY, also "
                                   "its engine and its input and output tensors (name, datatype, shape; -1 = any "
                                   "size) from ModelMetadata (--target). Exit status 1 unless it is READY.")
    p.add_argument("model")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("infer", help="run one inference with inputs from .npy files")
    p.add_argument("model")
    p.add_argument("--input", action="append", required=True, metavar="NAME=FILE.npy",
                   help="one per model input (repeat)")
    p.add_argument("--output", action="append", metavar="NAME", help="only return these outputs")
    p.add_argument("--output-dir", metavar="DIR", help="save each output as DIR/NAME.npy instead of printing")
    p.set_defaults(func=cmd_infer)
    p = sub.add_parser("generate", help="stream text from a language model (format = \"mlx-lm\") to the terminal",
                       description="Send PROMPT to MODEL over ModelStreamInfer (Triton vLLM-backend tensors) and "
                                   "print the text as it is generated. Unset options take the model's defaults "
                                   "(greedy, at most its max_new_tokens).")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, metavar="N")
    p.add_argument("--temperature", type=float, metavar="T", help="0 (the default) is greedy")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeat)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="for the whole call (default 300)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("load", help="verify and (re)load a configured model (admin target)",
                       description="Verify a model configured in sealboxd's config against its trust policy and "
                                   "start a new sandboxed worker on the verified bytes (a serving model whose new "
                                   "bytes are refused keeps serving). Exit 1 with the reason if verification "
                                   "refuses it or the worker fails to load it.")
    p.add_argument("model")
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("unload", help="stop a model's worker (admin target)",
                       description="Stop a model's worker and drop its verified copies; the model stays configured "
                                   "(UNLOADED) until `sealbox load` or a daemon restart.")
    p.add_argument("model")
    p.set_defaults(func=cmd_unload)
    p = sub.add_parser("demo", help="build, sign and serve a small demo MLX model and call it once (run as root)")
    p.add_argument("--dir", default=None, help="where the demo model, key and config live "
                   "(default: ~/.local/share/sealbox/demo)")
    p.add_argument("--once", action="store_true", help="stop the daemon after the first call")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("scan", help="scan a model file: BSON.jl, safetensors, GGUF or .mlxfn (inside the sandbox) "
                       "and say whether sealbox would load it",
                       description="Check one model file with the reader the worker would use, inside exactly that "
                                   "worker's sandbox: GGUF by its magic, safetensors by its header (a u64 length, "
                                   "then '{'), .mlxfn by its version field or suffix, anything else as a Flux.jl "
                                   "BSON file. Exit status: 0 accepted, 1 refused, 2 usage or I/O error.")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable verdict")
    p.set_defaults(func=cmd_scan)

    from . import publisher  # hash, sign, verify: sealbox.trust, the daemon's own verifier and policy
    publisher.add_commands(sub)
    from . import transfer_cli  # fetch, store ls|gc: sealbox.transfer
    transfer_cli.add_commands(sub)

    sandbox = sub.add_parser("sandbox", help="inspect the worker sandbox").add_subparsers(
        dest="sandbox_command", required=True, metavar="SUBCOMMAND")
    p = sandbox.add_parser("check", help="which sandbox layers this host supports and which workers would get")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sandbox_check)
    p = sandbox.add_parser("run-python", help="run a Python script inside exactly the sandbox a worker gets "
                           "with the default [workers] settings, after the worker's own self-restrictions, "
                           "in place of the model loader (run as root)")
    p.add_argument("--engine", choices=["mlx", "flux"], default="mlx")
    p.add_argument("--memory", default=None, metavar="SIZE", help="memory limit, e.g. 512M or 2G")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_sandbox_run_python)
    return parser


def _closed_stdout() -> int:
    """The reader went away (`sealbox models | head -1`): no traceback. Point stdout at /dev/null so
    the interpreter's own flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_USAGE


def _publish(argv: list[str]) -> int:
    from . import publisher
    try:
        status = publisher.main(argv)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        return _closed_stdout()
    except OSError as exc:
        print(f"sealbox: {exc}", file=sys.stderr)
        return EXIT_USAGE


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PUBLISHER_COMMANDS:
        return _publish(argv)
    args = build_parser().parse_args(argv)
    import grpc

    from ..proto import tensors
    from .client import StreamError
    try:
        status = args.func(args)
        sys.stdout.flush()   # here, so that a closed pipe is caught below
        return status
    except KeyboardInterrupt:   # Ctrl-C during `sealbox generate`: the call was cancelled
        return 130
    except BrokenPipeError:
        return _closed_stdout()
    except grpc.RpcError as exc:
        print(f"sealbox: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyError as exc:
        print(f"sealbox: {exc.args[0]}", file=sys.stderr)
        return EXIT_REFUSED
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except StreamError as exc:
        print(f"sealbox: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except tensors.TensorError as exc:  # an input the protocol cannot carry, or a malformed response
        print(f"sealbox: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as exc:
        print(f"sealbox: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
