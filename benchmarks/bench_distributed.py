"""Data-parallel curvature: ``torchrun`` with 2 processes x 1 thread against 1 process x 1 thread.

The job is HVP-heavy: ``flatcli spectrum CKPT --top-k 10 --trace`` (Lanczos for the top 10
Hessian eigenvalues, Hutch++ for the trace) on LeNet-5 over the first 4,000 digits of mnist5k's
training split, the LeNet-5 trained for ``--epochs`` epochs by ``flatcli train`` first. Both
runs are the real command line (``python -m flatcli`` and ``torchrun --standalone
--nproc-per-node 2 -m flatcli``), with ``OMP_NUM_THREADS=1`` in every process. Reported:

- wall time of each command (process start to exit: Python and torch imports, loading, measure);
- the measure's own time (the report's ``seconds`` for the checkpoint: loading + products);
- the speed-up of each, and whether the two reports agree (eigenvalues and trace to 1e-6
  relative in float32: the all-reduce changes the order of the additions);
- the communication per product, counted by :func:`flatcli.distributed.comm_stats` in a short
  2-process run of the same operator (``--inner``): collectives and floats all-reduced per
  product, against the parameter count.

    flock /tmp/flatcli-heavy.lock env OMP_NUM_THREADS=1 PYTHONPATH=. \\
        .venv/bin/python benchmarks/bench_distributed.py            # ~6 min on 2 cores
    ... bench_distributed.py --examples 1000 --top-k 3             # quick
    ... bench_distributed.py --sweep                               # the sharded sweep

``--sweep`` times a sharded sweep instead: ``flatcli rank DIR --measures top_eigenvalue`` over
``--checkpoints`` small ``--model`` networks (default LeNet-5) trained by ``flatcli train`` on
mnist5k (different seeds and learning rates), measured on ``--examples`` digits, with
``--no-cache``; ``torchrun`` with 2 processes gives each process half the checkpoints (each
measured alone) and gathers them on rank 0. Reported: wall time of each, the speed-up and
whether the two reports agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_COLOR": "1"}


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


def inner(examples: int) -> None:
    """Run under torchrun: count the communication of one operator's products."""
    import torch

    import flatcli
    from flatcli import distributed
    from flatcli.curvature.lanczos import lanczos
    from flatcli.curvature.operators import make_operator

    torch.set_num_threads(1)
    distributed.init("cpu")
    run = flatcli.load(
        os.environ["BENCH_CKPT"], dataset="mnist5k", max_examples=examples, device="cpu"
    )
    op = make_operator("hessian", run.model, run.x, run.y)
    distributed.reset_comm_stats()
    before = op.matvecs
    lanczos(op, k=3, steps=20)
    stats = distributed.comm_stats()
    products = op.matvecs - before
    if distributed.is_main():
        print(
            json.dumps(
                {
                    "world_size": distributed.world_size(),
                    "params": op.dim,
                    "products": products,
                    "collectives": stats.collectives,
                    "elements": stats.elements,
                    "examples_per_rank": op.examples_per_rank,
                }
            )
        )
    distributed.shutdown()


def sweep(py: str, torchrun: str, model: str, checkpoints: int, examples: int, epochs: int) -> None:
    """Time ``rank`` over ``checkpoints`` trained ``model``s: 1 process against torchrun 2."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed_sweep_"))
    runs = tmp / "runs"
    runs.mkdir()
    train = [py, "-m", "flatcli", "train", "--model", model, "--dataset", "mnist5k", "-q"]
    for i in range(checkpoints):
        lr = (0.02, 0.05, 0.1)[i % 3]
        out = runs / f"{model}-lr{lr}-s{i}.safetensors"
        _timed([*train, "--epochs", str(epochs), "--lr", str(lr), "--seed", str(i), "-o", str(out)])
    job = ["rank", str(runs), "--measures", "top_eigenvalue", "--max-examples", str(examples)]
    job += ["--no-cache", "--bootstrap", "200", "-q"]
    load = os.getloadavg()
    t1 = _timed([py, "-m", "flatcli", *job, "--json", str(tmp / "one.json")])
    two_cmd = [torchrun, "--standalone", "--nproc-per-node=2", "-m", "flatcli", *job]
    t2 = _timed([*two_cmd, "--json", str(tmp / "two.json")])
    one = json.loads((tmp / "one.json").read_text())
    two = json.loads((tmp / "two.json").read_text())

    def values(report: dict) -> dict[str, float]:
        return {
            Path(r["checkpoint"]).name: r["metrics"]["top_eigenvalue"] for r in report["results"]
        }

    v1, v2 = values(one), values(two)
    agree = v1.keys() == v2.keys() and all(abs(v1[k] - v2[k]) <= 1e-6 * abs(v1[k]) for k in v1)
    params = one["results"][0].get("num_params")
    print(f"load average before the timed runs: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    print(
        f"rank over {checkpoints} {model} checkpoints ({params:,} parameters each, "
        f"trained {epochs} epoch(s)), "
        f"--measures top_eigenvalue on {examples} mnist5k digits (float32), --no-cache; "
        f"world_size {two['environment'].get('world_size')}"
    )
    print()
    print("| run | wall s | speed-up (wall) |")
    print("|---|---:|---:|")
    print(f"| 1 process x 1 thread | {t1:.1f} | 1.00 |")
    print(f"| torchrun 2 processes x 1 thread | {t2:.1f} | {t1 / t2:.2f} |")
    print()
    print(f"top eigenvalues of every checkpoint agree to 1e-6: {agree}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="time a sharded rank sweep")
    parser.add_argument("--checkpoints", type=int, default=6, help="checkpoints of --sweep")
    parser.add_argument("--model", default="lenet5", help="zoo model of --sweep")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(200)
        return

    py = sys.executable
    torchrun = shutil.which("torchrun", path=str(Path(py).parent)) or "torchrun"
    if args.sweep:
        sweep(py, torchrun, args.model, args.checkpoints, args.examples, args.epochs)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    ckpt = tmp / "lenet5.safetensors"
    train = [py, "-m", "flatcli", "train", "--model", "lenet5", "--dataset", "mnist5k"]
    _timed([*train, "--epochs", str(args.epochs), "-o", str(ckpt), "-q"])

    job = ["spectrum", str(ckpt), "--top-k", str(args.top_k), "--trace"]
    job += ["--max-examples", str(args.examples), "-q"]
    load = os.getloadavg()
    t1 = _timed([py, "-m", "flatcli", *job, "--json", str(tmp / "one.json")])
    t2 = _timed(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "flatcli",
            *job,
            "--json",
            str(tmp / "two.json"),
        ]
    )
    one = json.loads((tmp / "one.json").read_text())
    two = json.loads((tmp / "two.json").read_text())
    m1, m2 = one["results"][0], two["results"][0]
    ev1 = m1["details"].get("eigenvalues") or []
    ev2 = m2["details"].get("eigenvalues") or []
    tr1, tr2 = m1["metrics"].get("trace"), m2["metrics"].get("trace")
    agree = all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(ev1, ev2, strict=True))
    agree = agree and tr1 is not None and abs(tr1 - tr2) <= 1e-6 * abs(tr1)

    comm_env = {**_env(), "BENCH_CKPT": str(ckpt)}
    res = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node=2", __file__, "--inner"],
        capture_output=True,
        text=True,
        env=comm_env,
    )
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    comm = json.loads(res.stdout.strip().splitlines()[-1])

    print(f"load average before the timed runs: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    print(
        f"LeNet-5 ({comm['params']:,} parameters), {args.examples} mnist5k digits, "
        f"spectrum --top-k {args.top_k} --trace (float32), "
        f"examples per rank {two['environment'].get('examples_per_rank')}"
    )
    print()
    print("| run | wall s | measure s | speed-up (wall) | speed-up (measure) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| 1 process x 1 thread | {t1:.1f} | {m1['seconds']:.1f} | 1.00 | 1.00 |")
    print(
        f"| torchrun 2 processes x 1 thread | {t2:.1f} | {m2['seconds']:.1f} | "
        f"{t1 / t2:.2f} | {m1['seconds'] / m2['seconds']:.2f} |"
    )
    print()
    print(
        f"products (1 process): {m1['metrics'].get('matvecs')}; "
        f"top eigenvalues agree to 1e-6 and trace to 1e-6: {agree} "
        f"(trace {tr1:.6g} vs {tr2:.6g})"
    )
    per = comm["elements"] / max(comm["products"], 1)
    print(
        f"communication: {comm['collectives']} all-reduces for {comm['products']} products, "
        f"{per:,.0f} floats per product = {per / comm['params']:.2f} x the parameter count "
        "(one buffer; a ring all-reduce moves 2(W-1)/W of it out of and into each rank)"
    )


if __name__ == "__main__":
    main()
