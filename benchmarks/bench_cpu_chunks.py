"""One curvature product on the CPU: the whole example set as one chunk against heap-sized chunks.

A Hessian-vector product over all 4,000 training digits of the README checkpoint (LeNet-5) as
one chunk allocates tensors above glibc's mmap threshold (32 MiB at most): each product maps
fresh pages, the kernel faults them in and zeroes them, and unmaps them again. flatcli's
automatic chunk on the CPU (:func:`flatcli.curvature.memory.cpu_chunk`) keeps every saved
activation within 4 MiB and keeps every chunk's graph. Both runs reuse their double-backward
graphs; each line is the mean over ``--repeats`` products after one warm-up, with the process's
user and system time and minor page faults per product. Also the GGN-vector product, the GGN
diagonal and one gradient pass, each as one chunk and as flatcli chunks it.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_cpu_chunks.py [--checkpoint CKPT]
[--repeats 5]`` (without a checkpoint, LeNet-5 is trained on mnist5k for 12 epochs first).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from flatcli.curvature.diagonal import ggn_diagonal
from flatcli.curvature.memory import cpu_chunk
from flatcli.curvature.operators import make_operator
from flatcli.io import load


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float, float, float]:
    """Mean wall, user and system seconds and minor faults per call of ``fn`` (after a warm-up)."""
    fn()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(repeats):
        fn()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return (
        wall / repeats,
        (r1.ru_utime - r0.ru_utime) / repeats,
        (r1.ru_stime - r0.ru_stime) / repeats,
        (r1.ru_minflt - r0.ru_minflt) / repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="the README checkpoint (default: train it)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(Path(tmp) / "lenet5.safetensors")
            train = ["train", "--model", "lenet5", "--dataset", "mnist5k", "--epochs", "12"]
            cmd = [sys.executable, "-m", "flatcli", *train, "-o", checkpoint]
            subprocess.run(cmd, check=True)
        run = load(checkpoint)
    model, x, y = run.model, run.x, run.y
    n, chunk = int(x.shape[0]), cpu_chunk(model, x)
    print(f"{n} examples; flatcli's CPU chunk: {chunk} examples")
    print("| work | chunks | wall s | user s | system s | minor faults | wall vs one chunk |")
    print("|---|---|---|---|---|---|---|")
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator())

    def grad(size: int) -> Callable[[], None]:
        def run_it() -> None:
            model.zero_grad()
            for i in range(0, n, size):
                loss = F.cross_entropy(model(x[i : i + size]), y[i : i + size], reduction="sum")
                loss.backward()

        return run_it

    def product(kind: str, size: int | None) -> Callable[[], torch.Tensor]:
        op = make_operator(kind, model, x, y, head_dtype=torch.float64, batch_size=size)
        return lambda: op.matvec(v)

    cases = [
        ("gradient pass", grad(n), grad(chunk)),
        ("Hessian-vector product", product("hessian", n), product("hessian", None)),
        ("GGN-vector product", product("ggn", n), product("ggn", None)),
        (
            "GGN diagonal",
            lambda: ggn_diagonal(model, x, y, batch_size=10 * n),
            lambda: ggn_diagonal(model, x, y),
        ),
    ]
    for label, whole, split in cases:
        repeats = 1 if label == "GGN diagonal" else args.repeats
        one = measure(whole, repeats)
        ours = measure(split, repeats)
        for name, m in (("one", one), ("flatcli", ours)):
            ratio = m[0] / one[0]
            print(
                f"| {label} | {name} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:,.0f} | "
                f"{ratio:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
