"""How much one curvature-vector product costs against one gradient on the same batch.

Claim checked: "one HVP costs at most 3x a gradient on the same batch". In ONE run, for an MLP
784-512-512-10 and LeNet-5 on 1,000 mnist5k training digits (float32, one chunk), it times

  - grad:             ``torch.autograd.grad`` of the mean cross-entropy (the baseline);
  - hvp:              ``make_operator("hessian").matvec`` as Lanczos calls it: auto method
                      (double backward), the graph of the chunk kept between products;
  - hvp uncached:     the same with ``cache=False``: every product rebuilds the graph (the cost
                      of a first product, or of every product when N spans several chunks);
  - hvp fwd-over-rev: ``hvp_method="forward-over-reverse"`` (torch.func jvp of grad);
  - ggn:              ``make_operator("ggn").matvec`` (auto: forward-over-reverse);
  - hvp x10 /col:     an uncached ``matmat`` of 10 columns (one graph, 10 backward passes), per
                      column,

and prints the median of ``--repeats`` runs after a warm-up, and each ratio to ``grad``.

    python benchmarks/bench_hvp.py            # ~1 min on a (shared) 2-core CPU
    python benchmarks/bench_hvp.py --quick    # fewer repeats

Times are process CPU time (robust to other processes on a shared machine) and wall time, with
one torch thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from flatcli.curvature.operators import make_operator  # noqa: E402


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from flatcli.data import load_dataset, subset

        part = subset(load_dataset("mnist5k").split("train"), n, seed=0)
        return part.x.float(), part.y, f"mnist5k train, first {n} after a seeded shuffle"
    except Exception as err:  # noqa: BLE001 - the data layer may not be there yet
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 28, 28, generator=g)
        return x, torch.randint(0, 10, (n,), generator=g), f"random MNIST-shaped tensors ({err})"


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    try:
        from model_zoo.registry import get_model

        return {
            "mlp 784-512-512-10": get_model("mlp", hidden=(512, 512)),
            "lenet5": get_model("lenet5"),
        }
    except Exception:  # noqa: BLE001 - fall back to local definitions
        mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )
        lenet = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )
        return {"mlp 784-512-512-10": mlp, "lenet5": lenet}


def _interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, tuple[float, float]]:
    """Median (process CPU seconds, wall seconds) of each function, timed round-robin.

    Round-robin spreads load from other processes over all functions alike; process CPU time
    (all threads) does not count the time the process waited for a core, so on a shared machine
    it measures the work, which is what the ratio is about.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


def bench(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int
) -> dict[str, tuple[float, float]]:
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(x)

    def gradient() -> object:
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def op(kind: str, **kw: object):
        return make_operator(kind, model, x, y, batch_size=n, **kw)

    hvp = op("hessian")  # auto: double backward, graph kept (all examples in one chunk)
    first = op("hessian", cache=False)  # every product rebuilds the graph
    fwd = op("hessian", hvp_method="forward-over-reverse")
    ggn = op("ggn")  # auto: forward-over-reverse
    assert hvp.hvp_method == "double-backward" and ggn.hvp_method == "forward-over-reverse"
    v = torch.randn(hvp.dim, generator=torch.Generator().manual_seed(0))
    V = torch.randn(hvp.dim, 10, generator=torch.Generator().manual_seed(1))
    rel = (hvp.matvec(v) - fwd.matvec(v)).norm() / fwd.matvec(v).norm()
    assert rel < 1e-4, f"forward-over-reverse and double backward disagree: {rel:.2e}"

    out = _interleaved_medians(
        {
            "grad": gradient,
            "hvp": lambda: hvp.matvec(v),
            "hvp uncached": lambda: first.matvec(v),
            "hvp fwd-over-rev": lambda: fwd.matvec(v),
            "ggn": lambda: ggn.matvec(v),
            "hvp x10 /col": lambda: first.matmat(V),
        },
        repeats,
    )
    c, w = out["hvp x10 /col"]
    out["hvp x10 /col"] = (c / 10, w / 10)
    return {"params": (float(hvp.dim), float(hvp.dim)), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--quick", action="store_true", help="5 repeats")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else args.repeats
    x, y, source = _data(args.examples)
    print(
        f"data: {source}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"float32, {args.examples} examples in one chunk, median of {repeats} (interleaved)"
    )
    cols = ["grad", "hvp", "hvp uncached", "hvp fwd-over-rev", "ggn", "hvp x10 /col"]
    head = " | ".join(f"{c} (ms)" for c in cols)
    ratios = " | ".join(f"{c} / grad" for c in cols[1:])
    print(f"| model | clock | {head} | {ratios} |")
    print("|" + "---|" * (2 * len(cols) + 1))
    for name, model in _models().items():
        r = bench(model, x, y, repeats)
        for i, clock in enumerate(("cpu", "wall")):
            ms = " | ".join(f"{1e3 * r[c][i]:.1f}" for c in cols)
            ratios = " | ".join(f"{r[c][i] / r['grad'][i]:.2f}" for c in cols[1:])
            print(f"| {name} ({int(r['params'][0]):,} params) | {clock} | {ms} | {ratios} |")


if __name__ == "__main__":
    main()
