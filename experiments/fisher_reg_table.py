"""Tabulate the Fisher-regulariser experiment (Jia & Su 2020, Table 2) from flatcli's reports.

Usage: python experiments/fisher_reg_table.py GAMMA.json SPECTRUM.json

Reads a ``flatcli gamma --json`` and a ``flatcli spectrum --trace --json`` report over the same
checkpoints and each checkpoint's training record, groups the checkpoints by whether
``--fisher-reg`` was on, and prints one row per checkpoint and then, per group, the mean ± the
sample standard deviation over seeds (ddof = 1, numpy's ``std(ddof=1)``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from flatcli.io.checkpoint import load_checkpoint

COLUMNS = (
    ("test error %", "test_error"),
    ("train loss", "train_loss"),
    ("γ̂", "gamma_hat"),
    ("tr(ξ)/N'", "fisher_trace"),
    ("λ_max(ξ)", "spectral_radius"),
    ("Hessian trace", "trace"),
    ("λ_max(H)", "top_eigenvalue"),
)


def _rows(gamma_path: str, spectrum_path: str) -> list[dict]:
    by_ckpt: dict[str, dict] = {}
    stderr: dict[str, float] = {}
    for path in (gamma_path, spectrum_path):
        for entry in json.loads(Path(path).read_text())["results"]:
            if entry["error"] is not None:
                continue
            by_ckpt.setdefault(entry["checkpoint"], {}).update(entry["metrics"])
            if "trace_stderr" in entry["metrics"]:
                stderr[entry["checkpoint"]] = entry["metrics"]["trace_stderr"]
    rows = []
    for ckpt, metrics in sorted(by_ckpt.items()):
        meta = load_checkpoint(ckpt).meta
        rows.append(
            {
                "checkpoint": Path(ckpt).name,
                "reg": bool(meta["train"].get("fisher_reg")),
                "seed": meta["train"].get("seed"),
                "beta": meta["train"].get("reg_beta"),
                "test_error": 100 * (1 - meta["results"]["test_acc"]),
                "train_loss": meta["results"]["train_loss"],
                "train_acc": meta["results"]["train_acc"],
                "trace_stderr": stderr.get(ckpt),
                **metrics,
            }
        )
    return rows


def _cell(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def main(gamma_path: str, spectrum_path: str) -> None:
    rows = _rows(gamma_path, spectrum_path)
    head = ["checkpoint", "train acc", *(label for label, _ in COLUMNS), "Hessian trace stderr"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for r in rows:
        cells = [r["checkpoint"], f"{r['train_acc']:.4f}"]
        cells += [_cell(r.get(key)) for _, key in COLUMNS] + [_cell(r["trace_stderr"])]
        print("| " + " | ".join(cells) + " |")
    print()
    print("| regulariser | runs | " + " | ".join(label for label, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for reg in (False, True):
        group = [r for r in rows if r["reg"] is reg]
        if not group:
            continue
        cells = []
        for _, key in COLUMNS:
            v = np.array([r.get(key) for r in group], dtype=float)
            sd = f" ± {v.std(ddof=1):.2g}" if len(v) > 1 else ""
            cells.append(f"{v.mean():.4g}{sd}")
        label = f"with (β = {group[0]['beta']:g})" if reg else "without"
        print(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python experiments/fisher_reg_table.py GAMMA.json SPECTRUM.json")
    main(sys.argv[1], sys.argv[2])
