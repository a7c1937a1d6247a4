"""Correlate sharpness measures with the generalisation gap (normalized-flat-minima.md §6).

Reads a ``flatcli sharpness --json`` report over the random-label checkpoints and each
checkpoint's recorded train/test accuracy, prints a markdown table and the Pearson and
Kendall-tau correlations of each measure against the accuracy gap.

Usage: python experiments/correlate.py runs/rl/sharpness.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from scipy import stats

from flatcli.io.checkpoint import load_checkpoint

MEASURES = (("normalized_sharpness", "normalized sharpness"), ("hessian_trace", "Hessian trace"))


def main(report_path: str) -> None:
    report = json.loads(Path(report_path).read_text())
    rows = []
    for entry in report["results"]:
        path = Path(entry["checkpoint"])
        if not path.is_absolute() and not path.exists():
            path = Path(report_path).parent / path.name
        res = load_checkpoint(path).meta["results"]
        match = re.search(r"r([0-9.]+)\.safetensors$", path.name)
        ratio = float(match.group(1)) if match else float("nan")
        gap = res["train_acc"] - res["test_acc"]
        rows.append(
            (
                ratio,
                res["train_acc"],
                res["test_acc"],
                gap,
                *(entry["metrics"].get(key) for key, _ in MEASURES),
            )
        )
    rows.sort()
    head = [
        "random-label ratio",
        "train acc",
        "test acc",
        "accuracy gap",
        *(label for _, label in MEASURES),
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r[0]:.1f}", f"{r[1]:.4f}", f"{r[2]:.4f}", f"{r[3]:.4f}"]
        cells += ["n/a" if v is None else f"{v:.4g}" for v in r[4:]]
        print("| " + " | ".join(cells) + " |")
    print()
    print("| measure vs accuracy gap | Pearson r | Kendall τ |")
    print("|---|---|---|")
    gaps = [r[3] for r in rows]
    for i, (_, label) in enumerate(MEASURES):
        pairs = [(g, r[4 + i]) for g, r in zip(gaps, rows, strict=True) if r[4 + i] is not None]
        if len(pairs) < 3:
            print(f"| {label} | n/a | n/a |")
            continue
        g, v = zip(*pairs, strict=True)
        pearson = stats.pearsonr(g, v)[0]
        kendall = stats.kendalltau(g, v)[0]
        print(f"| {label} | {pearson:.3f} | {kendall:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/correlate.py REPORT.json")
    main(sys.argv[1])
