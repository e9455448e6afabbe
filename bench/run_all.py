"""Run every benchmark in bench/ (bench_*.py), one after the other.

Usage: .venv/bin/python bench/run_all.py [ARGS...]
ARGS (e.g. --blas-threads 1) are passed to every benchmark. `make bench` runs this.
Each benchmark prints its table and writes bench/results/<name>.json.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main() -> int:
    subprocess.run([sys.executable, str(BENCH / "export_model.py")], check=True)  # once, reused after
    failed = []
    for script in sorted(BENCH.glob("bench_*.py")):
        print(f"\n=== {script.name} {' '.join(sys.argv[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.run([sys.executable, str(script), *sys.argv[1:]]).returncode
        print(f"=== {script.name}: exit {code} after {time.perf_counter() - started:.0f}s", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
