"""`sealbox scan FILE.bson [--json]`: the scanner's verdict on one BSON.jl file.

Exit status: 0 accepted, 1 refused or not a model, 2 usage or I/O error.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import scanner


def main(argv: list[str]) -> int:
    """Run with the arguments after `scan` (e.g. ["model.bson", "--json"])."""
    parser = argparse.ArgumentParser(
        prog="sealbox scan",
        description="Check a Flux.jl model saved with BSON.jl against sealbox's allowlist, without loading it.")
    parser.add_argument("file", help="the .bson file")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.add_argument("--name", help="the name to report the file by (the sandbox sees only /proc/self/fd/N)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:        # argparse has printed the usage or the help
        return 0 if exit_.code == 0 else 2
    try:
        verdict = scanner.scan_file(args.file, args.name)
    except OSError as err:
        print(f"sealbox scan: {args.file}: {err.strerror or err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(verdict.to_json(), ensure_ascii=False, indent=2))
    else:
        print(f"{verdict.file}: {verdict.status}"
              + (f" (Flux model under key '{verdict.model.key}')" if verdict.model else ""))
        lines = verdict.model.describe() if verdict.model else [str(r) for r in verdict.reasons]
        for line in lines:
            print(f"  {line}")
    return 0 if verdict.accepted else 1
