"""Each analysis command with its default options on the README's checkpoint: does it finish?

Issue #22 asks every analysis command, run with default options on the README checkpoint
(LeNet-5 trained 12 epochs on mnist5k, 4,000 training examples) on a 2-core CPU with one
thread, to finish within 60 s. Each command runs in a fresh process, as a user runs it; the
line gives its wall time (process start included), its CPU time, and that time in units of a
baseline measured in the same run: one gradient pass (forward and backward of the mean
cross-entropy) over the same 4,000 examples, in-process, best of 5.

``--before DIR`` also runs every command from another checkout of flatcli (``git worktree add
DIR <commit>``) with the same interpreter, so the table shows before and after side by side.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_defaults.py [--checkpoint CKPT] [--before DIR]
[--commands gamma spectrum ...]``. Without ``--checkpoint`` the README checkpoint is trained
first (about 20 s).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ("gamma", "sharpness", "spectrum", "kfac", "pacbayes", "landscape")
LIMIT_SECONDS = 60.0


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system of the child) and exit code of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode not in (0, 3):
        sys.stderr.write(done.stderr.decode(errors="replace")[-2000:])
    return wall, cpu, done.returncode


def _gradient_pass(checkpoint: str) -> float:
    """Best-of-5 seconds of one gradient pass over the checkpoint's training split."""
    from torch.nn import functional as F

    from flatcli.io import load

    run = load(checkpoint)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        run.model.zero_grad()
        F.cross_entropy(run.model(run.x), run.y).backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="the README checkpoint (default: train it)")
    parser.add_argument("--before", type=Path, help="another flatcli checkout to compare")
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    flatcli = [sys.executable, "-m", "flatcli"]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(Path(tmp) / "lenet5.safetensors")
            train = ["train", "--model", "lenet5", "--dataset", "mnist5k", "--epochs", "12"]
            subprocess.run([*flatcli, *train, "-o", checkpoint], env=env, check=True)
        grad = _gradient_pass(checkpoint)
        print(f"baseline: one gradient pass over the training split, {grad:.3f} s (best of 5)")
        versions = [("after", env)]
        if args.before is not None:
            old = {**env, "PYTHONPATH": str(args.before.resolve())}
            versions.insert(0, ("before", old))
        print("| command | version | wall s | CPU s | wall / gradient pass | ≤ 60 s | exit |")
        print("|---|---|---|---|---|---|---|")
        for command in args.commands:
            for version, venv in versions:
                out = str(Path(tmp) / f"{command}-{version}.json")
                wall, cpu, code = _run([*flatcli, command, checkpoint, "--json", out], venv)
                ok = "yes" if wall <= LIMIT_SECONDS and code in (0, 3) else "no"
                print(
                    f"| {command} | {version} | {wall:.1f} | {cpu:.1f} | {wall / grad:.0f} | "
                    f"{ok} | {code} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
