"""Start-up time of the command line: ``flatcli --help`` and every command's ``--help``.

Each line is the median wall time of ``--repeats`` fresh interpreters, next to two baselines
measured in the same run: ``python -c pass`` (the interpreter alone) and ``python -c "import
torch"`` (what a command that measures pays before its first product). Issue #21 asks for
``--help`` of every command under 2 s and the top level under 0.3 s.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_cli_startup.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flatcli.cli.app import COMMANDS


def _flatcli() -> list[str]:
    """The console script beside this interpreter, else the package run as a module."""
    script = Path(sys.executable).parent / "flatcli"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flatcli"]


def median_seconds(argv: list[str], repeats: int) -> float:
    """Median wall time of ``argv`` over ``repeats`` runs (it must exit 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per line (median)")
    args = parser.parse_args()
    python, flatcli = [sys.executable, "-c"], _flatcli()
    cases = [("python -c pass", [*python, "pass"])]
    cases += [("python -c 'import torch'", [*python, "import torch"])]
    cases += [("flatcli --help", [*flatcli, "--help"])]
    cases += [(f"flatcli {c} --help", [*flatcli, c, "--help"]) for c in COMMANDS]
    rows = [(label, median_seconds(argv, args.repeats)) for label, argv in cases]
    bare, torch = rows[0][1], rows[1][1]
    print(f"median of {args.repeats} runs; Python {sys.version.split()[0]}")
    print("| command | seconds | × `python -c pass` | × `import torch` |")
    print("|---|---|---|---|")
    for label, seconds in rows:
        print(f"| `{label}` | {seconds:.2f} | {seconds / bare:.1f} | {seconds / torch:.2f} |")


if __name__ == "__main__":
    main()
