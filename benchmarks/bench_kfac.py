"""Benchmark of ``flatcli kfac``'s factors (docs/benchmarks.md, "K-FAC factors").

Claim: the Kronecker factors E[M] and E[xxᵀ] of ALL layers cost at most 1.2x the time of
(c + 1) batched backward passes over the same examples (each pass a forward and a backward of
the mean cross-entropy in the same batches), measured in one run.

Models: LeNet-5 and F-200² (model_zoo ``lenet5``, ``mlp``; trained weights are not needed for
timing: the cost does not depend on the values) on the mnist5k training split, float32, one
intra-op thread. Rounds are interleaved and the minimum of each is kept; times are CPU seconds
of this process (``time.process_time``), as in the other benchmarks of this folder.

    python benchmarks/bench_kfac.py            # N = 4000, 5 rounds
    python benchmarks/bench_kfac.py --quick    # N = 1000, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatcli.curvature import kfac as kfac_module  # noqa: E402
from flatcli.curvature.kfac import kfac_factors  # noqa: E402
from flatcli.curvature.losses import cross_entropy  # noqa: E402
from model_zoo import get_model  # noqa: E402


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from flatcli.data import load_dataset

        split = load_dataset("mnist5k").split("train")
        return split.x[:n], split.y[:n], f"mnist5k train split (first {n} digits)"
    except Exception as e:  # noqa: BLE001 - say what was used instead
        g = torch.Generator().manual_seed(0)
        x = torch.rand((n, 1, 28, 28), generator=g)
        return x, torch.randint(0, 10, (n,), generator=g), f"random tensors ({e})"


def _passes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, count: int):
    """``count`` batched forward+backward passes of the mean loss over all of x."""
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(count):
        for b in range(0, x.shape[0], batch):
            loss = cross_entropy(model(x[b : b + batch]), y[b : b + batch]).mean()
            torch.autograd.grad(loss, params)


def _time(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def bench(name: str, n: int, rounds: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = get_model(name).eval()
    x, y, source = _data(n)
    c = int(model(x[:1]).shape[1])
    real = kfac_module.backward_to_outputs

    def stacked() -> None:  # the fallback: one backward of the batch repeated c times
        def no_vmap(z, targets, cot, *, batched=False):
            if batched:
                raise RuntimeError("vmap disabled for the benchmark")
            return real(z, targets, cot)

        kfac_module.backward_to_outputs = no_vmap
        try:
            kfac_factors(model, x, y, batch_size=batch)
        finally:
            kfac_module.backward_to_outputs = real

    runs = {
        "kfac_factors": lambda: kfac_factors(model, x, y, batch_size=batch),
        "kfac_factors_stacked": stacked,
        "c+1 passes": lambda: _passes(model, x, y, batch, c + 1),
        "1 pass": lambda: _passes(model, x, y, batch, 1),
    }
    for f in runs.values():  # warm-up
        f()
    best = {k: float("inf") for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            best[k] = min(best[k], _time(f))
    layers = len(kfac_factors(model, x[:2], y[:2]))
    return {
        "model": name,
        "layers": layers,
        "classes": c,
        "examples": n,
        "batch": batch,
        "data": source,
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "ratio_vs_c+1_passes": round(best["kfac_factors"] / best["c+1 passes"], 3),
        "ratio_stacked_vs_c+1_passes": round(best["kfac_factors_stacked"] / best["c+1 passes"], 3),
        "ratio_vs_1_pass": round(best["kfac_factors"] / best["1 pass"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1000, 2 rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, rounds = (1000, 2) if args.quick else (4000, 5)
    report = {
        "torch": torch.__version__,
        "threads": args.threads,
        "results": [bench(m, n, rounds, args.batch) for m in ("lenet5", "mlp")],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
