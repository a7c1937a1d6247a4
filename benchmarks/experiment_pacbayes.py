"""The analogue of Table 1 of Wu et al. 2020 (§6), scaled to a 2-core CPU.

Trains T-w (mlp hidden [w]), T-2w, T-(w/2)² and R-w (random labels) with ``flatcli train``
on ``fashion-mnist-2`` (all 60,000 training images, or a seeded subset) and on ``mnist5k-2``
(all 4,000 digits), then runs ``flatcli pacbayes --split trained`` with ``--method vanilla``,
``approx-hessian`` and ``iterative-hessian`` on each, and prints one markdown table per
dataset (bound, with the test error beside it); the prior is data-free (``--prior data-free``,
centred on the recorded initialisation). Every command is printed and run through the
shared heavy-job lock
(``flock /tmp/flatcli-heavy.lock``), one command at a time.

    OMP_NUM_THREADS=1 python benchmarks/experiment_pacbayes.py --out runs/pacbayes
    python benchmarks/experiment_pacbayes.py --out runs/pacbayes --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLATCLI = str(ROOT / ".venv" / "bin" / "flatcli")
METHODS = ("vanilla", "approx-hessian", "iterative-hessian")


def _run(cmd: list[str], lock: bool) -> None:
    full = (["flock", "/tmp/flatcli-heavy.lock"] if lock else []) + cmd
    print("$ " + shlex.join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(full, check=True, env=env)


def _nets(width: int) -> dict[str, tuple[list[int], float]]:
    half = width // 2
    return {
        f"T-{width}": ([width], 0.0),
        f"T-{2 * width}": ([2 * width], 0.0),
        f"T-{half}x2": ([half, half], 0.0),
        f"R-{width}": ([width], 1.0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/pacbayes"))
    p.add_argument("--width", type=int, default=100, help="w of T-w (the paper: 600)")
    p.add_argument("--fashion-subset", type=int, default=0, help="0: all 60,000 training images")
    p.add_argument("--train-epochs", type=int, default=20)
    p.add_argument("--random-epochs", type=int, default=100)
    p.add_argument(
        "--opt-steps",
        type=int,
        default=7500,
        help="steps of the bound optimisation (epochs = steps·B/m, so both sets get the same)",
    )
    p.add_argument("--opt-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--mc-samples", type=int, default=500)
    p.add_argument("--test-mc-samples", type=int, default=100)
    p.add_argument("--datasets", default="fashion-mnist-2,mnist5k-2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--no-lock", action="store_true")
    args = p.parse_args()
    lock = not args.no_lock
    args.out.mkdir(parents=True, exist_ok=True)
    datasets = args.datasets.split(",")
    nets = _nets(args.width)
    if not args.table_only:
        for ds in datasets:
            folder = args.out / ds
            folder.mkdir(parents=True, exist_ok=True)
            for name, (hidden, random_labels) in nets.items():
                spec = folder / f"{name}.yaml"
                spec.write_text(f"arch: mlp\nkwargs: {{hidden: {json.dumps(hidden)}}}\n")
                ckpt = folder / f"{name}.safetensors"
                if ckpt.exists():
                    continue
                cmd = [
                    FLATCLI,
                    "train",
                    "--model",
                    str(spec),
                    "--dataset",
                    ds,
                    "-o",
                    str(ckpt),
                    "--lr",
                    "0.01",
                    "--momentum",
                    "0.9",
                    "--batch-size",
                    "128",
                    "--target-train-acc",
                    "1.0",
                    "--device",
                    "cpu",
                    "--quiet",
                ]
                cmd += ["--epochs", str(args.random_epochs if random_labels else args.train_epochs)]
                if random_labels:
                    cmd += ["--random-labels", str(random_labels)]
                if ds.startswith("fashion") and args.fashion_subset:
                    cmd += ["--train-subset", str(args.fashion_subset)]
                _run(cmd, lock)
            m = (args.fashion_subset or 60000) if ds.startswith("fashion") else 4000
            epochs = max(1, round(args.opt_steps * args.opt_batch_size / m))
            eta = max(1, epochs // 4)  # iterative-hessian: 4 bases over the run
            for method in args.methods.split(","):
                report = folder / f"pacbayes-{method}.json"
                if report.exists():
                    continue
                ckpts = [str(folder / f"{n}.safetensors") for n in nets]
                _run(
                    [
                        FLATCLI,
                        "pacbayes",
                        *ckpts,
                        "--split",
                        "trained",
                        "--prior",
                        "data-free",
                        "--method",
                        method,
                        "--epochs",
                        str(epochs),
                        "--lr",
                        str(args.lr),
                        "--opt-batch-size",
                        str(args.opt_batch_size),
                        "--mc-samples",
                        str(args.mc_samples),
                        "--test-mc-samples",
                        str(args.test_mc_samples),
                        "--eta",
                        str(eta),
                        "--device",
                        "cpu",
                        "--json",
                        str(report),
                        "--quiet",
                    ],
                    lock,
                )
    for ds in datasets:
        folder = args.out / ds
        rows: dict[str, dict[str, dict]] = {}
        for method in METHODS:
            report = folder / f"pacbayes-{method}.json"
            if not report.exists():
                continue
            for r in json.loads(report.read_text())["results"]:
                rows.setdefault(Path(r["checkpoint"]).stem, {})[method] = r
        if not rows:
            continue
        print(f"\n{ds}:\n")
        print(
            "| net | params | m | train err | test err | "
            + " | ".join(f"{m} bound (KL, SNN train/test err)" for m in METHODS)
            + " |"
        )
        print("|---|---|---|---|---|" + "---|" * len(METHODS))
        for name in nets:
            per = rows.get(name, {})
            any_r = next(iter(per.values()), None)
            if any_r is None:
                continue
            mm = any_r["metrics"]
            cells = []
            for method in METHODS:
                r = per.get(method)
                if r is None or r["error"] is not None:
                    cells.append("error" if r else "-")
                    continue
                m = r["metrics"]
                vac = " (vacuous)" if r["details"]["vacuous"] else ""
                test = m["snn_test_error"]
                cells.append(
                    f"**{m['bound']:.3f}**{vac} ({m['kl']:.0f}, "
                    f"{m['snn_train_error']:.3f}/{'-' if test is None else f'{test:.3f}'})"
                )
            print(
                f"| {name} | {any_r['num_params']:,} | {mm['num_train']:,} | "
                f"{mm['train_error']:.3f} | {mm['test_error']:.3f} | " + " | ".join(cells) + " |"
            )


if __name__ == "__main__":
    sys.exit(main())
