"""Normalized sharpness on LeNet-5 / mnist5k: where the time goes (diagonal vs convex solver).

Hutchinson (the paper's Algorithm 1, with exact HVPs) against the exact GGN diagonal, which for
LeNet-5 (ReLU, max pooling: piecewise linear in each weight) equals the Hessian diagonal.

Trains LeNet-5 (model_zoo, 61,706 parameters) on mnist5k with Adam (lr 1e-3, batch 128) for a
few epochs, then runs ``compute_sharpness`` with only ``normalized_sharpness`` (Hutchinson
diagonal of the NSCE Hessian, Eq. 17 solved per layer with its certified gap, jackknife over
probe groups) and reports the split of the wall time: the Hessian diagonal (HVPs), the
per-layer convex solver, and the jackknife (one solve per probe group, at a looser tolerance).

    PYTHONPATH=. python benchmarks/bench_sharpness.py           # 1,000 examples, 100 probes
    PYTHONPATH=. python benchmarks/bench_sharpness.py --quick   # 500 examples, 40 probes
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

import model_zoo
from flatcli.data.registry import load_dataset
from flatcli.data.splits import Split, subset
from flatcli.measures.sharpness import SharpnessConfig, compute_sharpness


def trained_lenet(
    epochs: int, seed: int = 0
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]:
    """LeNet-5 trained on the mnist5k train split; returns (model, x, y, train accuracy)."""
    data = load_dataset("mnist5k")
    torch.manual_seed(seed)
    model = model_zoo.get_model("lenet5", num_classes=10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.train.x, data.train.y
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    return model, x, y, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 examples, 40 probes, 2 epochs")
    ap.add_argument("--examples", type=int, default=None, help="examples the Hessian is over")
    ap.add_argument("--probes", type=int, default=None, help="Hutchinson probes for the diagonal")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = args.examples or (500 if args.quick else 1000)
    probes = args.probes or (40 if args.quick else 100)
    epochs = args.epochs or (2 if args.quick else 5)

    t0 = time.perf_counter()
    model, x, y, acc = trained_lenet(epochs)
    split = subset(Split(x, y), examples, seed=0)
    xs, ys = split.x, split.y
    setup = time.perf_counter() - t0
    print(
        f"LeNet-5 ({sum(p.numel() for p in model.parameters())} params), trained {epochs} epochs "
        f"(train acc {acc:.3f}); {len(xs)} examples; setup {setup:.1f}s; "
        f"torch threads {torch.get_num_threads()}"
    )

    print()
    print(
        "| diag method | HVPs | diagonal s | solver s | jackknife s | total s | solver share "
        "| solver+jackknife share | normalized sharpness | stderr | certified gap |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    runs = {}
    for method in ("hutchinson", "ggn"):
        config = SharpnessConfig(
            measures=("normalized_sharpness",),
            diag_method=method,
            probes=probes,
            probe_groups=10,
            batch_size=250,
            seed=0,
        )
        t1 = time.perf_counter()
        res = compute_sharpness(model, xs, ys, config)
        total = time.perf_counter() - t1
        info, m = res.details(), res.metrics()
        runs[method] = (info, m)
        sec = info["seconds"]
        diag, solver, jack = sec["diagonal"], sec["solver"], sec.get("jackknife", 0.0)
        se = m.get("normalized_sharpness_stderr")
        print(
            f"| {method}{f' ({probes} probes)' if method == 'hutchinson' else ''} "
            f"| {info['products']['diagonal']} | {diag:.2f} | {solver:.3f} | "
            f"{jack:.3f} | {total:.2f} | {100 * solver / total:.2f} % | "
            f"{100 * (solver + jack) / total:.2f} % "
            f"| {m['normalized_sharpness']:.6g} | {'-' if se is None else f'{se:.3g}'} "
            f"| {m['normalized_sharpness_gap']:.2g} |"
        )
    print()
    print("LeNet-5 is piecewise linear in each single weight, so its GGN diagonal IS its Hessian")
    print("diagonal (for any loss head): the ggn row is the exact value Hutchinson estimates.")
    print()
    print(
        "| layer | (rows, cols) | exact term | Hutchinson term | iterations | Newton steps | gap "
        "| h <= 0 entries exact / Hutchinson |"
    )
    print("|---|---|---|---|---|---|---|---|")
    params = dict(model.named_parameters())
    hut, ggn = runs["hutchinson"][0]["solver"], runs["ggn"][0]["solver"]
    for name, s in ggn.items():
        shape = tuple(params[name].shape[:2])
        print(
            f"| {name} | {shape} | {s['value']:.6g} | {hut[name]['value']:.6g} | {s['iterations']} "
            f"| {s['newton_steps']} | {s['gap']:.2g} | {s['clipped_entries']} / "
            f"{hut[name]['clipped_entries']} of {params[name].numel()} |"
        )


if __name__ == "__main__":
    main()
