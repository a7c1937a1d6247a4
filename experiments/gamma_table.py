"""Tabulate a `flatcli gamma --json` report against each checkpoint's recorded test error.

Usage: python experiments/gamma_table.py REPORT.json [--group-by confusion_size,fisher_reg]
Prints the mean ± std of each metric per group of checkpoints (default: the recorded
confusion-set size and whether the Fisher regulariser was on), then the Spearman rank
correlation of each metric with the test error over all checkpoints.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from scipy import stats

from flatcli.io.checkpoint import load_checkpoint

METRICS = (
    "gamma_hat",
    "fisher_frobenius_sq",  # exact ||xi||_F^2 / N'^2
    "fisher_frobenius_sq_diag",  # Jia & Su's Appendix D estimate, (1/N') sum ||g_n||^4
    "spectral_radius",
    "fisher_trace",
    "robustness",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument(
        "--group-by", default="confusion_size,fisher_reg", help="record keys, comma-separated"
    )
    args = parser.parse_args()
    report = json.load(open(args.report))
    rows = []
    for entry in report["results"]:
        if entry["error"] is not None:
            continue
        meta = load_checkpoint(entry["checkpoint"]).meta
        group = tuple(meta["train"].get(k) for k in args.group_by.split(","))
        test_error = 100 * (1 - meta["results"]["test_acc"])
        rows.append((group, entry["checkpoint"], test_error, entry["metrics"]))
    shown = [m for m in METRICS if any(r[3].get(m) is not None for r in rows)]
    keys = args.group_by.replace(",", ", ")
    print(f"| {keys} | test error % | " + " | ".join(shown) + " |")
    print("|---" * (len(shown) + 2) + "|")
    groups = defaultdict(list)
    for group, _, err, metrics in rows:
        groups[group].append((err, metrics))
    for group in sorted(groups):
        errs = np.array([e for e, _ in groups[group]])
        cells = [f"{errs.mean():.2f} ± {errs.std():.2f}"]
        for m in shown:
            v = np.array([mm[m] for _, mm in groups[group]], dtype=float)
            cells.append(f"{v.mean():.4g} ± {v.std():.2g}")
        print(f"| {', '.join(map(str, group))} | " + " | ".join(cells) + " |")
    errors = [r[2] for r in rows]
    print()
    for m in shown:
        rho = stats.spearmanr(errors, [r[3][m] for r in rows]).statistic
        print(f"Spearman rho({m}, test error) over {len(rows)} models: {rho:.2f}")


if __name__ == "__main__":
    main()
