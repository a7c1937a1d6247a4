"""PAC-Bayes certificates with the default data-dependent prior, made by flatcli's own commands.

Stages (each prints and runs ``flatcli`` commands, one at a time, under the shared heavy-job
lock ``flock /tmp/flatcli-heavy.lock``, with one intra-op thread; a report that exists is
reused):

- ``readme``: the README's LeNet-5 on mnist5k (``--readme-ckpt``, trained with
  ``flatcli train --model lenet5 --dataset mnist5k --epochs 12`` when missing): the default
  certificate for ``--seed`` 0, 1, 2, the data-free one (``--prior data-free``) and, for the
  same seeds, the certificate whose prior starts from a fresh initialisation
  (``--prior-start fresh``).
- ``fashion10``: LeNet-5 trained on all 60,000 Fashion-MNIST images (10 classes), then the
  data-dependent certificate with ``--prior-fraction 0.8`` (48,000 examples train the prior,
  12,000 are the bound's: the default 0.5 would put 30,000 through the 1,000-sample
  Monte-Carlo step, over 20 minutes on one thread), and the same network's data-free
  certificate with a shortened optimisation and 100 weight samples (the defaults would take an
  hour: 1,000 samples × 60,000 examples).
- ``table1``: the MLPs of the Table 1 experiment (``benchmarks/experiment_pacbayes.py``'s
  training commands: T-100, T-200, T-50x2, R-100 on fashion-mnist-2 and mnist5k-2), certified
  with ``--split trained`` and the default data-dependent prior.

    OMP_NUM_THREADS=1 python benchmarks/experiment_pacbayes_data_dependent.py --out runs/pbdd
    python benchmarks/experiment_pacbayes_data_dependent.py --out runs/pbdd --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLATCLI = str(ROOT / ".venv" / "bin" / "flatcli")
TABLE1_NETS = {"T-100": ([100], 0.0), "T-200": ([200], 0.0), "T-50x2": ([50, 50], 0.0)}
TABLE1_NETS["R-100"] = ([100], 1.0)


def _run(cmd: list[str], out: Path, lock: bool = True) -> None:
    """Run ``cmd`` unless ``out`` exists; print it and the wall time it took."""
    if out.exists():
        return
    print("$ " + shlex.join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(
        (["flock", "/tmp/flatcli-heavy.lock"] if lock else []) + cmd, check=True, env=env
    )
    print(f"  ({time.perf_counter() - t0:.0f} s wall)", flush=True)


def _pacbayes(ckpts: list[Path], report: Path, *options: str) -> None:
    cmd = [FLATCLI, "pacbayes", *map(str, ckpts), *options, "--device", "cpu"]
    _run([*cmd, "--json", str(report), "--quiet"], report)


def stage_readme(out: Path, ckpt: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        train = [FLATCLI, "train", "--model", "lenet5", "--dataset", "mnist5k", "--epochs", "12"]
        _run([*train, "-o", str(ckpt), "--device", "cpu", "--quiet"], ckpt)
    for seed in (0, 1, 2):
        _pacbayes([ckpt], out / f"default-seed{seed}.json", "--seed", str(seed))
    _pacbayes([ckpt], out / "data-free.json", "--prior", "data-free")
    for seed in (0, 1, 2):
        name = "fresh-start.json" if seed == 0 else f"fresh-start-seed{seed}.json"
        _pacbayes([ckpt], out / name, "--prior-start", "fresh", "--seed", str(seed))


def stage_fashion10(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "lenet5.safetensors"
    train = [FLATCLI, "train", "--model", "lenet5", "--dataset", "fashion-mnist", "--epochs", "10"]
    _run([*train, "-o", str(ckpt), "--device", "cpu", "--quiet"], ckpt)
    _pacbayes([ckpt], out / "data-dependent.json", "--prior-fraction", "0.8")
    _pacbayes(
        [ckpt],
        out / "data-free.json",
        *("--prior", "data-free", "--epochs", "4", "--mc-samples", "100"),
    )


def stage_table1(out: Path) -> None:
    for ds in ("mnist5k-2", "fashion-mnist-2"):
        folder = out / ds
        folder.mkdir(parents=True, exist_ok=True)
        ckpts = []
        for name, (hidden, random_labels) in TABLE1_NETS.items():
            spec = folder / f"{name}.yaml"
            spec.write_text(f"arch: mlp\nkwargs: {{hidden: {json.dumps(hidden)}}}\n")
            ckpt = folder / f"{name}.safetensors"
            ckpts.append(ckpt)
            cmd = [FLATCLI, "train", "--model", str(spec), "--dataset", ds, "-o", str(ckpt)]
            cmd += ["--lr", "0.01", "--momentum", "0.9", "--batch-size", "128"]
            cmd += ["--target-train-acc", "1.0", "--device", "cpu", "--quiet"]
            cmd += ["--epochs", "100" if random_labels else "20"]
            if random_labels:
                cmd += ["--random-labels", str(random_labels)]
            _run(cmd, ckpt)
        _pacbayes(ckpts, folder / "data-dependent.json", "--split", "trained")


def _rows(report: Path) -> list[dict]:
    return json.loads(report.read_text())["results"] if report.exists() else []


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _cell(entry: dict) -> str:
    m, d = entry["metrics"], entry["details"]
    vac = " (vacuous)" if d["vacuous"] else ""
    cells = [
        f"**{m['bound']:.3f}**{vac}",
        _num(m["kl"], ".1f"),
        _num(m["snn_train_error"]),
        _num(m["snn_test_error"]),
        _num(m["posterior_mean_test_error"]),
        _num(m["test_error"]),
        f"{m['prior_examples']:,}/{m['bound_examples']:,}",
        f"{entry['seconds']:.0f}",
    ]
    return " | ".join(cells)


HEADER = (
    "| checkpoint | run | bound | KL | SNN err (bound ex.) | SNN test err | posterior-mean "
    "test err | checkpoint test err | prior/bound examples | s |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def tables(out: Path) -> None:
    print(HEADER)
    for name, report in [
        *[(f"default, --seed {s}", out / "readme" / f"default-seed{s}.json") for s in (0, 1, 2)],
        ("--prior data-free", out / "readme" / "data-free.json"),
        ("--prior-start fresh", out / "readme" / "fresh-start.json"),
        *[
            (f"--prior-start fresh --seed {s}", out / "readme" / f"fresh-start-seed{s}.json")
            for s in (1, 2)
        ],
        ("--prior-fraction 0.8", out / "fashion10" / "data-dependent.json"),
        ("--prior data-free --epochs 4 --mc-samples 100", out / "fashion10" / "data-free.json"),
        *[
            ("--split trained", out / ds / "data-dependent.json")
            for ds in ("mnist5k-2", "fashion-mnist-2")
        ],
    ]:
        for entry in _rows(report):
            ck = Path(entry["checkpoint"])
            label = f"{ck.parent.name}/{ck.stem}"
            if entry["error"] is not None:
                print(f"| {label} | {name} | error: {entry['error']['message']} |")
                continue
            print(f"| {label} | {name} | {_cell(entry)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/pbdd"))
    p.add_argument("--readme-ckpt", type=Path, default=None, help="default: OUT/readme/lenet5")
    p.add_argument("--stages", default="readme,fashion10,table1")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    if not args.table_only:
        stages = args.stages.split(",")
        if "readme" in stages:
            ckpt = args.readme_ckpt or args.out / "readme" / "lenet5.safetensors"
            stage_readme(args.out / "readme", ckpt)
        if "fashion10" in stages:
            stage_fashion10(args.out / "fashion10")
        if "table1" in stages:
            stage_table1(args.out)
    tables(args.out)


if __name__ == "__main__":
    sys.exit(main())
