"""Benchmark of ``flatcli gamma``'s per-example Gram engine (results in docs/benchmarks.md).

Time: γ̂ with N' = 100, T = 100 (10,000 per-example gradients) on LeNet-5 (model_zoo ``lenet5``,
float32) on the bundled mnist5k training split, against the floor = one batched forward +
backward of the mean loss over the same 10,000 examples, and against the materialised
``vmap(grad)`` engine on the same samples. Rounds are interleaved and the minimum of each is
kept. Times are CPU seconds of this process (``time.process_time``) with one intra-op thread by
default: on a machine shared with other jobs, wall-clock times and multi-threaded CPU times
(OpenMP threads spin while a sibling is descheduled) vary by 2-5x between runs.

Memory: peak resident memory of one Gram of N' samples on WRN-16-4 (model_zoo ``wrn``, CIFAR-
shaped random inputs), ghost against materialised, each in a fresh subprocess.

    python benchmarks/bench_gamma.py            # both parts (about a minute on 2 cores)
    python benchmarks/bench_gamma.py --quick    # T = 10 trials, 1 round, memory with N' = 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatcli.curvature.gram import GramEngine  # noqa: E402
from flatcli.measures.gamma import GammaConfig, compute_gamma, draw_samples  # noqa: E402
from model_zoo import get_model  # noqa: E402


def _data() -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from flatcli.data import load_dataset

        split = load_dataset("mnist5k").split("train")
        return split.x, split.y, "mnist5k train split (4,000 real MNIST digits)"
    except Exception as e:  # noqa: BLE001 - say what was used instead
        g = torch.Generator().manual_seed(0)
        x = torch.rand((4000, 1, 28, 28), generator=g)
        y = torch.randint(0, 10, (4000,), generator=g)
        return x, y, f"random MNIST-shaped tensors (mnist5k unavailable: {e})"


def bench_time(trials: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = get_model("lenet5").eval()
    x, y, source = _data()
    n = 100
    idx = draw_samples(len(x), n, trials, seed=0).reshape(-1)
    xs, ys = x[idx], y[idx]
    config = GammaConfig(samples=n, trials=trials)
    materialised = GramEngine(model, method="materialize")

    def floor() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs), ys).backward()
        model.zero_grad(set_to_none=True)

    def floor_chunked() -> None:  # the same work in the chunks gamma uses
        model.zero_grad(set_to_none=True)
        for c0 in range(0, len(xs), 1000):
            (F.cross_entropy(model(xs[c0 : c0 + 1000]), ys[c0 : c0 + 1000]) * 0.1).backward()
        model.zero_grad(set_to_none=True)

    def gamma() -> None:
        compute_gamma(model, x, y, config)

    def mat() -> None:
        materialised.grams(xs, ys, n)

    runs = {"floor": floor, "floor_chunked": floor_chunked, "gamma": gamma, "materialize": mat}
    best = {k: float("inf") for k in runs}
    floor()  # warm up
    gamma()
    for r in range(rounds):
        for name, fn in runs.items():
            if name == "materialize" and r > 0:  # 5-10x slower: one round is enough
                continue
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t0)
    result = compute_gamma(model, x, y, config)
    return {
        "data": source,
        "model": "lenet5 (61,706 params, float32)",
        "samples": n,
        "trials": trials,
        "threads": torch.get_num_threads(),
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "gamma_over_floor": round(best["gamma"] / best["floor"], 2),
        "gamma_over_floor_chunked": round(best["gamma"] / best["floor_chunked"], 2),
        "materialize_over_floor": round(best["materialize"] / best["floor"], 2),
        "engine": result.details()["engine"],
        "gamma_hat": result.metrics()["gamma_hat"],
    }


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (Linux); without it the peak is since start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(method: str, n: int) -> None:
    torch.manual_seed(0)
    model = get_model("wrn", depth=16, widen_factor=4).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, 3, 32, 32), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    engine = GramEngine(model, method=method, chunk_size=n)
    engine.grams(x[:2], y[:2])  # warm up (lazy imports, allocator) on 2 examples
    base = _rss_mib()
    _reset_peak()
    t0 = time.process_time()
    xi = engine.grams(x, y)
    seconds = time.process_time() - t0
    print(
        json.dumps(
            {
                "method": engine.method.value,
                "baseline_mib": round(base, 1),
                "peak_mib": round(_peak_mib(), 1),
                "peak_over_baseline_mib": round(_peak_mib() - base, 1),
                "seconds": round(seconds, 2),
                "trace": float(xi[0].trace()),
                "num_params": engine.num_params,
            }
        )
    )


def bench_memory(n: int) -> dict:
    out = {}
    for method in ("ghost", "materialize"):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                method,
                "--memory-samples",
                str(n),
                "--threads",
                str(torch.get_num_threads()),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    W = out["ghost"]["num_params"]
    out["samples"] = n
    out["n_times_w_float32_mib"] = round(n * W * 4 / 2**20, 1)
    out["trace_rel_diff"] = abs(out["ghost"]["trace"] - out["materialize"]["trace"]) / abs(
        out["materialize"]["trace"]
    )
    return out


ZOO = ("lenet5", "resnet20", "wrn", "cnn6", "vgg11", "densenet-bc")


def _zoo_row(name: str, n: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = get_model(name).eval()
    shape = (1, 28, 28) if name.startswith("lenet") else (3, 32, 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *shape), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    ghost = GramEngine(model, chunk_size=n)
    mat = GramEngine(model, method="materialize", chunk_size=n)
    ghost.grams(x[:2], y[:2])  # warm up (and the ghost engine's one-time checks)
    mat.grams(x[:2], y[:2])

    def floor() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    runs = {
        "floor": floor,
        "ghost": lambda: ghost.grams(x, y),
        "materialize": lambda: mat.grams(x, y),
    }
    best = {k: float("inf") for k in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            t0 = time.process_time()
            fn()
            best[key] = min(best[key], time.process_time() - t0)
    return {
        "model": name,
        "num_params": ghost.num_params,
        "samples": n,
        **{k: round(v, 2) for k, v in best.items()},
        "ghost_over_floor": round(best["ghost"] / best["floor"], 1),
        "materialize_over_floor": round(best["materialize"] / best["floor"], 1),
    }


def bench_zoo(names: list[str], n: int, rounds: int) -> list[dict]:
    """One Gram of n random inputs per model: ghost vs materialised vs one forward+backward."""
    rows = []
    for name in names:
        rows.append(_zoo_row(name, n, rounds))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 10, one round, N' = 8 memory")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument(
        "--zoo",
        nargs="*",
        default=None,
        metavar="MODEL",
        help=f"only compare the engines on model_zoo models (default {' '.join(ZOO)})",
    )
    parser.add_argument("--memory-child", choices=["ghost", "materialize"], help=argparse.SUPPRESS)
    parser.add_argument("--memory-samples", type=int, default=None, help="N' for the memory part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_samples)
        return
    if args.zoo is not None:
        n = args.memory_samples or 100
        print(json.dumps(bench_zoo(args.zoo or list(ZOO), n, rounds=2), indent=2))
        return
    report = {"time": bench_time(trials=10 if args.quick else 100, rounds=1 if args.quick else 3)}
    if not args.skip_memory:
        report["memory"] = bench_memory(args.memory_samples or (8 if args.quick else 32))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
