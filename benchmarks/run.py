"""Run every benchmark in this folder, one after the other: `python -m benchmarks.run [NAME ...]`
from the repository root (`./dev.sh bench [NAME ...]` does that).

Each prints medians and ratios against a baseline measured in the same run.
"""
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
    failed = 0
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        failed |= subprocess.run([sys.executable, "-m", f"benchmarks.{script.stem}"], cwd=HERE.parent).returncode
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
