"""``flatcli rank``: per-checkpoint overhead against the measure's own time, and statistics speed.

1. A sweep of small models (untrained ``mlp`` F-64 checkpoints with training records, on the
   bundled mnist5k, 1,000 training digits each): every checkpoint ranked by one measure with no
   cache. The overhead of a checkpoint is its wall time minus the measure's own time (loading
   the file, building the model, taking the examples, fingerprinting them, reading the record,
   bookkeeping); the issue asks for at most 10 % of the measure's time. The same sweep again
   from a warm cache shows what a resumed sweep costs.
2. The statistics over 1,000 synthetic checkpoints on a 5 x 5 x 5 x 8 grid (Kendall τ-a,
   1,000-resample bootstrap interval, Spearman ρ, ψ_i and Ψ, the PGDL score, the robust
   sign-error): the issue asks for well under a second.

Run: ``PYTHONPATH=. python benchmarks/bench_rank.py [--checkpoints 8] [--measure top_eigenvalue]``
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _write_sweep(folder: Path, n: int, hidden: int) -> list[Path]:
    from flatcli.io.checkpoint import save_checkpoint
    from model_zoo import get_model

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_model("mlp", hidden=[hidden])
        meta = {
            "dataset": "mnist5k",
            "train": {"lr": 0.01 * (1 + i % 2), "batch_size": 32 * (1 + (i // 2) % 2), "seed": i},
            "results": {
                "train_acc": 1.0,
                "test_acc": 0.9 - 0.01 * i,
                "train_loss": 0.0,
                "test_loss": 0.1 * i,
            },
        }
        spec = {"arch": "mlp", "kwargs": {"hidden": [hidden]}}
        paths.append(
            save_checkpoint(folder / f"m{i:02d}.safetensors", model.state_dict(), spec, meta)
        )
    return paths


def overhead(n: int, hidden: int, measure: str, examples: int) -> None:
    from flatcli.rank import LoadOptions, RankConfig, ResultCache, rank_checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_sweep(Path(tmp), n, hidden)
        cfg = RankConfig(metrics=(measure,), bootstrap=1000)
        opts = LoadOptions(max_examples=examples, device="cpu")
        cache = Path(tmp) / "cache"
        start = time.perf_counter()
        res = rank_checkpoints(paths, cfg, opts, cache=ResultCache(cache))
        wall = time.perf_counter() - start
        assert all(r["error"] is None for r in res.rows), [r["error"] for r in res.rows]
        first, rest = res.timings[0], res.timings[1:]  # the first loads the dataset too
        total = sum(t["total"] for t in rest)
        meas = sum(t["measure"] for t in rest)
        print(f"sweep: {n} x mlp F-{hidden} on {examples} mnist5k digits, measure {measure}")
        print(
            f"  first checkpoint (loads the dataset): {first['total']:.3f} s, "
            f"measure {first['measure']:.3f} s"
        )
        print(
            f"  checkpoints 2..{n}: measure {meas / len(rest):.3f} s each, overhead "
            f"{(total - meas) / len(rest) * 1000:.1f} ms each, overhead / measure = "
            f"{(total - meas) / meas:.3%}"
        )
        print(f"  whole sweep incl. statistics: {wall:.2f} s")
        start = time.perf_counter()
        again = rank_checkpoints(paths, cfg, opts, cache=ResultCache(cache))
        rerun = time.perf_counter() - start
        assert again.cache_hits == n
        print(
            f"  rerun from the cache: {rerun:.2f} s ({rerun / n * 1000:.0f} ms per checkpoint, "
            f"{rerun / wall:.1%} of the first run)"
        )


def statistics_speed(repeats: int) -> None:
    from flatcli.measures.registry import Direction
    from flatcli.rank.core import RankConfig, sweep_statistics

    rng = np.random.default_rng(0)
    grid = list(itertools.product(range(5), range(5), range(5), range(8)))
    rows = []
    for a, b, c, d in grid:
        gap = 0.05 * a + 0.02 * b + rng.normal(scale=0.05)
        rows.append(
            {
                "error": None,
                "gap": float(gap),
                "metrics": {"m": float(gap + rng.normal(scale=0.05))},
                "hyperparameters": {"a": a, "b": b, "c": c, "d": d},
                "details": {"generalization": {"test_size": 10000}},
            }
        )
    cfg = RankConfig(metrics=("m",), bootstrap=1000)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        st, _ = sweep_statistics(rows, {"m": Direction.SHARPER}, cfg)
        times.append(time.perf_counter() - start)
    s = st["m"]
    print(
        f"statistics over {len(rows)} checkpoints, 4 axes, 1,000 bootstrap resamples: "
        f"best {min(times):.3f} s, median {sorted(times)[len(times) // 2]:.3f} s of {repeats}"
    )
    print(
        f"  τ-a {s['kendall_tau']:.4f}, CI {s['kendall_tau_ci']}, Ψ {s['psi']:.4f}, "
        f"PGDL {s['pgdl_cmi']:.4f}, robust sign-error {s['robust_sign_error']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--measure", default="top_eigenvalue")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    overhead(args.checkpoints, args.hidden, args.measure, args.examples)
    statistics_speed(args.repeats)


if __name__ == "__main__":
    main()
