"""Scenario I of fisher-gamma-local-minima.md §7.1 on a CPU budget: γ̂ against a confusion set.

Each run trains LeNet-5 (``flatcli train``) on a fixed subset of the mnist5k training split plus a
confusion set of C further training images with uniformly random labels, to 100 % training
accuracy (or the epoch cap), then measures γ̂ (N' = T = 100) and its baselines on the clean
training subset only (as the paper: "all metrics based on the sampled training images") and
reads the test error from the checkpoint record. A larger confusion set should give a higher
test error; the paper finds γ̂, the Frobenius norm and the spectral radius rise with it and
robustness does not.

    python benchmarks/experiment_gamma_confusion.py --out runs/gamma-confusion
    python benchmarks/experiment_gamma_confusion.py --quick      # 2 sizes, 1 seed, small caps
    python benchmarks/experiment_gamma_confusion.py --sizes 0 --fisher-reg 100  # §7.2.2 check

Checkpoints already present in ``--out`` are reused, so an interrupted run resumes. By default a
run stops at 100 % training accuracy; ``--fixed-epochs`` trains every run equally long (the
paper's protocol: 200 epochs for all, learning rate divided by 10 on plateaus).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatcli.data import load_dataset  # noqa: E402
from flatcli.io.checkpoint import load_checkpoint  # noqa: E402
from flatcli.io.spec import build_model, resolve_spec  # noqa: E402
from flatcli.measures.gamma import GammaConfig, compute_gamma  # noqa: E402
from flatcli.train import TrainConfig, prepare_train_split  # noqa: E402


def train(out: Path, confusion: int, seed: int, args: argparse.Namespace) -> Path:
    reg = f"_reg{args.fisher_reg:g}" if args.fisher_reg else ""
    ckpt = out / f"lenet5_c{confusion}_s{seed}{reg}.safetensors"
    if ckpt.exists():
        return ckpt
    cmd = [sys.executable, "-m", "flatcli", "train", "--model", "lenet5", "--dataset", "mnist5k"]
    cmd += ["-o", str(ckpt), "--train-subset", str(args.subset), "--confusion-size", str(confusion)]
    cmd += ["--optimizer", args.optimizer, "--lr", str(args.lr), "--batch-size", "128"]
    cmd += ["--epochs", str(args.epochs), "--seed", str(seed), "-q"]
    if args.fixed_epochs:  # every run the same length; the learning rate / 10 at 2/3 of it
        cmd += ["--schedule", "step", "--milestones", str(2 * args.epochs // 3)]
    else:
        cmd += ["--target-train-acc", "1.0"]
    if args.fisher_reg:
        cmd += ["--fisher-reg", "--reg-beta", str(args.fisher_reg)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return ckpt


def clean_subset(subset: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training subset a run with this seed trained on, without its confusion set (the
    draws are nested: the subset does not depend on the confusion size)."""
    data = load_dataset("mnist5k")
    split, info = prepare_train_split(
        data.train, data.num_classes, TrainConfig(train_subset=subset, seed=seed), seed
    )
    return split.x[:subset], split.y[:subset]


def measure(ckpt: Path, subset: int, seed: int, samples: int, trials: int) -> dict:
    c = load_checkpoint(ckpt)
    model = build_model(resolve_spec(ckpt, None, c.spec))
    model.load_state_dict(c.state_dict)
    model.eval()
    x, y = clean_subset(subset, seed)
    t0 = time.perf_counter()
    result = compute_gamma(model, x, y, GammaConfig(samples=samples, trials=trials, baselines=True))
    seconds = time.perf_counter() - t0
    rec = c.meta["results"]
    return {
        "checkpoint": ckpt.name,
        "train_acc": rec["train_acc"],
        "train_loss": rec["train_loss"],
        "test_error": 100 * (1 - rec["test_acc"]),
        "epochs": rec["epochs"],
        **result.metrics(),
        "singular_trials": result.singular_trials,
        "gamma_seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gamma-confusion")
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 500, 1000, 2000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--fixed-epochs",
        action="store_true",
        help="train every run for --epochs epochs (learning rate / 10 at 2/3) instead of "
        "stopping at 100%% training accuracy",
    )
    parser.add_argument(
        "--fisher-reg",
        type=float,
        default=None,
        metavar="BETA",
        help="train with the Fisher-trace regulariser of Eq. 6 (reg-beta BETA); files *_regBETA",
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.seeds, args.epochs, args.trials = [0, 1000], [0], 20, 10
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for confusion in args.sizes:
        for seed in args.seeds:
            ckpt = train(args.out, confusion, seed, args)
            row = {
                "confusion": confusion,
                "seed": seed,
                "fisher_reg": args.fisher_reg,
                **measure(ckpt, args.subset, seed, args.samples, args.trials),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    name = f"results_reg{args.fisher_reg:g}.json" if args.fisher_reg else "results.json"
    (args.out / name).write_text(json.dumps(rows, indent=1))
    keys = [
        "test_error",
        "gamma_hat",
        "fisher_frobenius_sq",
        "spectral_radius",
        "fisher_trace",
        "robustness",
    ]
    print("| confusion | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for confusion in args.sizes:
        group = [r for r in rows if r["confusion"] == confusion]
        cells = []
        for k in keys:
            vals = torch.tensor([r[k] for r in group if r[k] is not None], dtype=torch.float64)
            std = float(vals.std()) if len(vals) > 1 else 0.0
            cells.append(f"{float(vals.mean()):.4g} ± {std:.2g}" if len(vals) else "n/a")
        print(f"| {confusion} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
