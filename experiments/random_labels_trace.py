"""The random-label table with the exact Hessian trace next to its Hutchinson estimate.

Usage: python experiments/random_labels_trace.py runs/rl/sharpness.json [MORE.json ...] [--json OUT]

For each checkpoint of a ``flatcli sharpness --measure normalized_sharpness --measure
hessian_trace --json`` report (experiments/random_labels.sh; several reports are read as one),
on the data and labels it was trained on (``--split trained``, all of them), computes the exact
trace of the Hessian of the mean cross-entropy as the exact trace of the GGN (K passes of
per-example gradient norms, no probes; equal to the sum of ``ggn_diagonal``). For a
ReLU network the two diagonals coincide (almost everywhere): the network is piecewise linear in
any single weight, so :math:`\\partial^2 f/\\partial w_i^2 = 0` and the residual term of the
Hessian has a zero diagonal. Prints the table of experiments/correlate.py with the report's
Hutchinson estimate ± its standard error, the exact trace, the estimate's error in standard
errors, and the Pearson r and Kendall τ of each measure against the accuracy gap.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from scipy import stats

import flatcli
from flatcli.curvature.gram import per_example_sq_norms
from flatcli.curvature.losses import output_hessian_sqrt


def _relu_mlp(model: torch.nn.Module) -> bool:
    leaves = [m for m in model.modules() if not list(m.children())]
    kinds = (torch.nn.ReLU, torch.nn.Linear, torch.nn.Flatten, torch.nn.Identity)
    return all(isinstance(m, kinds) for m in leaves)


def ggn_trace(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr G = (1/N) Σ_n Σ_c ‖J_nᵀ q_nc‖², q_nc the rows of Q_n with Q_nᵀQ_n = diag(p_n) − p_n p_nᵀ.

    Each of the K sums over n is the sum of per-example squared gradient norms of the linear
    "loss" q_nc · z_n (``per_example_sq_norms``, the ghost engine: one forward and one backward
    per chunk), so the exact trace costs K passes over the data instead of K·N per-example
    Jacobians.
    """
    with torch.no_grad():
        logits = torch.cat([model(xb) for xb in x.split(1024)]).double()
    q = output_hessian_sqrt(logits)  # (N, K, K), exact for confident examples
    idx = torch.arange(x.shape[0])
    total = 0.0
    for c in range(q.shape[1]):  # K directions (K = 10 here), not examples
        qc = q[:, c, :]

        def linear(z: torch.Tensor, i: torch.Tensor, qc: torch.Tensor = qc) -> torch.Tensor:
            return (qc[i].to(z.dtype) * z).sum(-1)

        total += float(per_example_sq_norms(model, x, idx, loss_fn=linear).sum())
    return total / x.shape[0]


def exact_trace(checkpoint: Path) -> tuple[float, float]:
    """(exact Hessian trace of the mean CE on the checkpoint's training data, seconds)."""
    run = flatcli.load(checkpoint, split="trained", device="cpu")
    if not _relu_mlp(run.model):
        raise SystemExit(f"{checkpoint}: the GGN trace equals the Hessian's for ReLU MLPs only")
    t0 = time.perf_counter()
    return ggn_trace(run.model, run.x, run.y), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--no-exact", action="store_true", help="only the report's estimates ± stderr"
    )
    args = parser.parse_args()
    reports = [(p, json.loads(p.read_text())) for p in args.reports]
    report = reports[0][1]
    entries = [(p, e) for p, r in reports for e in r["results"]]
    rows = []
    for report_path, entry in entries:
        path = Path(entry["checkpoint"])
        if not path.is_absolute() and not path.exists():
            path = report_path.parent / path.name
        res = flatcli.io.checkpoint.load_checkpoint(path).meta["results"]
        match = re.search(r"r([0-9.]+)\.safetensors$", path.name)
        exact, seconds = (float("nan"), 0.0) if args.no_exact else exact_trace(path)
        m = entry["metrics"]
        rows.append(
            {
                "ratio": float(match.group(1)) if match else float("nan"),
                "train_acc": res["train_acc"],
                "test_acc": res["test_acc"],
                "gap": res["train_acc"] - res["test_acc"],
                "normalized_sharpness": m.get("normalized_sharpness"),
                "hutchinson": m.get("hessian_trace"),
                "hutchinson_stderr": m.get("hessian_trace_stderr"),
                "exact": exact,
                "exact_seconds": round(seconds, 1),
            }
        )
    rows.sort(key=lambda r: r["ratio"])
    probes = report.get("config", {}).get("trace_probes", "?")
    print(
        "| random-label ratio | train acc | test acc | accuracy gap | normalized sharpness "
        f"| Hessian trace, {probes} probes ± stderr | Hessian trace, exact "
        "| (estimate − exact)/stderr |"
    )
    print("|---" * 8 + "|")
    for r in rows:
        se = r["hutchinson_stderr"]
        est = "n/a" if r["hutchinson"] is None else f"{r['hutchinson']:.4g}"
        if se is not None:
            est += f" ± {se:.2g}"
        z = "n/a" if se in (None, 0) else f"{(r['hutchinson'] - r['exact']) / se:+.2f}"
        print(
            f"| {r['ratio']:.1f} | {r['train_acc']:.4f} | {r['test_acc']:.4f} | {r['gap']:.4f} "
            f"| {r['normalized_sharpness']:.4g} | {est} | {r['exact']:.4g} | {z} |"
        )
    print()
    print("| measure vs accuracy gap | Pearson r | Kendall τ |")
    print("|---|---|---|")
    gaps = [r["gap"] for r in rows]
    for key, label in (
        ("normalized_sharpness", "normalized sharpness"),
        ("exact", "Hessian trace (exact)"),
        ("hutchinson", f"Hessian trace ({probes}-probe estimate)"),
    ):
        v = [r[key] for r in rows]
        print(
            f"| {label} | {stats.pearsonr(gaps, v)[0]:.3f} | {stats.kendalltau(gaps, v)[0]:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
