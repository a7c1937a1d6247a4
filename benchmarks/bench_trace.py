"""Hessian trace: Hutch++ against Hutchinson at equal budgets, errors measured over seeds.

The operator is the Hessian of a 784-32-32-10 ReLU MLP trained briefly on 2,000 mnist5k digits
(the setup of ``bench_lanczos.py``). A trained network's Hessian has ~c-1 large outlier
eigenvalues that carry most of ``||H||_F``, which is what Hutchinson's variance
``2 Σ_{i≠j} H_ij²`` is made of; Hutch++ (Meyer et al. 2021) removes them with a sketch and
estimates only the remainder.

Exact trace: for a ReLU MLP (piecewise linear) the Hessian diagonal equals the GGN diagonal, so
``tr(H) = Σ diag(GGN)``, computed exactly from per-example Jacobians
(:func:`flatcli.curvature.diagonal.ggn_diagonal`).

For each budget m (products), Hutchinson runs on 360/m disjoint seeds and Hutch++ on ``--seeds``
seeds; the table gives the empirical RMS error against the exact trace and the mean reported
standard error. "Hutchinson HVPs for the same error" is ``(σ / rms_Hutch++)²`` with σ the pooled
per-probe standard deviation of Hutchinson (its error at m probes is σ/√m).

    PYTHONPATH=. python benchmarks/bench_trace.py            # ~35 s of CPU on one core
    PYTHONPATH=. python benchmarks/bench_trace.py --quick    # 1,000 examples, budgets 30 and 60
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from bench_lanczos import trained_mlp

from flatcli.curvature.diagonal import ggn_diagonal
from flatcli.curvature.operators import make_operator
from flatcli.curvature.trace import hutchinson, hutchpp

HUTCHINSON_PROBES_PER_BUDGET = 360


def _rms(errors: list[float]) -> float:
    return math.sqrt(sum(e * e for e in errors) / len(errors))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 examples, budgets 30 and 60")
    ap.add_argument("--examples", type=int, default=None, help="training examples (default 2000)")
    ap.add_argument("--seeds", type=int, default=8, help="Hutch++ seeds per budget")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    examples = args.examples or (1000 if args.quick else 2000)
    budgets = [30, 60] if args.quick else [30, 60, 120]

    t0 = time.perf_counter()
    model, x, y = trained_mlp(examples)
    op = make_operator("hessian", model, x, y, batch_size=len(x))
    exact = float(sum(d.sum() for d in ggn_diagonal(model, x, y).values()))
    print(
        f"MLP 784-32-32-10 ({op.dim} params), {len(x)} mnist5k examples; exact tr(H) = "
        f"{exact:.6f}; setup {time.perf_counter() - t0:.1f}s, torch threads {args.threads}"
    )

    rows = []
    pooled_var, pooled_n = 0.0, 0
    for m in budgets:
        h = [hutchinson(op, m, seed=s) for s in range(HUTCHINSON_PROBES_PER_BUDGET // m)]
        p = [hutchpp(op, m, seed=1000 + s) for s in range(args.seeds)]
        pooled_var += sum(m * e.stderr**2 for e in h)
        pooled_n += len(h)
        rows.append((m, h, p))
    sigma = math.sqrt(pooled_var / pooled_n)
    print(f"Hutchinson per-probe std σ = {sigma:.3f} (its error at m probes: σ/√m)\n")

    head = (
        f"{'HVPs':>5s} | {'Hutchinson rms err':>18s} {'mean stderr':>11s} {'runs':>4s} | "
        f"{'Hutch++ rms err':>15s} {'mean stderr':>11s} {'runs':>4s} | "
        f"{'Hutchinson HVPs for same err':>28s} {'ratio':>6s}"
    )
    print(head)
    print("-" * len(head))
    ratios = []
    for m, h, p in rows:
        h_rms = _rms([e.value - exact for e in h])
        p_rms = _rms([e.value - exact for e in p])
        need = (sigma / p_rms) ** 2
        ratios.append(m / need)
        print(
            f"{m:5d} | {h_rms:18.3f} {sum(e.stderr for e in h) / len(h):11.3f} {len(h):4d} | "
            f"{p_rms:15.3f} {sum(e.stderr for e in p) / len(p):11.3f} {len(p):4d} | "
            f"{need:28.0f} {m / need:6.3f}"
        )
    print(
        f"\nrelative error of Hutch++ at {budgets[-1]} HVPs: "
        f"{_rms([e.value - exact for e in rows[-1][2]]) / abs(exact):.2e}"
    )
    ok = all(r <= 0.5 for r in ratios)
    print(
        f"target (Hutch++ reaches Hutchinson's error with <= 1/2 the HVPs): "
        f"{'met' if ok else 'NOT met'} (HVP ratios {', '.join(f'{r:.3f}' for r in ratios)})"
    )
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
