"""Peak memory of one per-example Gram matrix, ghost vs materialised, against N' and against W.

What grows with what: each point is one Gram matrix ξ = J Jᵀ of N' examples computed by
``flatcli.curvature.gram.GramEngine`` (``method="ghost"`` or ``"materialize"``, the whole sample
in one chunk, as ``flatcli gamma`` does for N' up to its chunk size) in a fresh Python process,
so that nothing cached by an earlier point counts. Memory is the process's peak resident set
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after a 2-example warm-up) minus its
resident set before the Gram: torch's CPU allocations are plain ``malloc``/``mmap``, which
``tracemalloc`` does not see but the resident set does.

Series (random inputs and an untrained network: memory does not depend on the weights):

- ``n``: WRN-16-4 (model_zoo ``wrn``, CIFAR-shaped inputs, W = 2,748,890), N' = 8 ... 64;
- ``w-conv``: WRN-16-k for k = 1, 2, 4, 8 (W = 0.18M ... 11M) at N' = 32: the activations per
  example grow like k, W like k²;
- ``w-mlp``: an MLP 784-h-h-10 (model_zoo ``mlp``) for h = 256 ... 2048 at N' = 32: the
  activations grow like h, W like h².

Besides the measured peak the script prints, per point, N'·W float32 (the size of J),
N' × the activation bytes of one example (what autograd saves for backward, as flatcli's chunk
sizing measures it) and the engine's fixed float64 workspace bound.

    python benchmarks/bench_gram_memory.py                 # all three series (~2 min, 1 thread)
    python benchmarks/bench_gram_memory.py --series n      # one series
    python benchmarks/bench_gram_memory.py --json out.json
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

from flatcli.curvature.gram import WORKSPACE, GramEngine  # noqa: E402
from flatcli.curvature.memory import activation_bytes_per_example  # noqa: E402
from model_zoo import get_model  # noqa: E402

MIB = 2**20
SERIES = {
    "n": [("wrn", 4, n) for n in (8, 16, 32, 64)],
    "w-conv": [("wrn", k, 32) for k in (1, 2, 4, 8)],
    "w-mlp": [("mlp", h, 32) for h in (256, 512, 1024, 2048)],
}


def _build(arch: str, size: int) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if arch == "wrn":
        return get_model("wrn", depth=16, widen_factor=size).eval(), (3, 32, 32)
    return get_model("mlp", hidden=[size, size]).eval(), (1, 28, 28)


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(method: str, arch: str, size: int, n: int) -> dict:
    """One point, in this (fresh) process: peak resident memory of one Gram of ``n`` examples."""
    model, shape = _build(arch, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *shape), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    engine = GramEngine(model, method=method, chunk_size=n)
    engine.grams(x[:2], y[:2])  # warm-up: lazy imports, allocator, thread pools
    base = _status_mib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    t0 = time.process_time()
    xi = engine.grams(x, y)
    seconds = time.process_time() - t0
    peak = _status_mib("VmHWM")
    return {
        "method": engine.method.value,
        "arch": arch,
        "size": size,
        "n": n,
        "num_params": engine.num_params,
        "peak_over_baseline_mib": round(peak - base, 1),
        "seconds": round(seconds, 2),
        "trace": float(xi[0].trace()),
        "activation_mib_per_example": round(activation_bytes_per_example(model, shape) / MIB, 3),
    }


def point(method: str, arch: str, size: int, n: int, threads: int) -> dict:
    """Run :func:`child` in a fresh interpreter and return its JSON line."""
    cmd = [sys.executable, __file__, "--child", method, arch, str(size), str(n)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", choices=sorted(SERIES), action="append")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        method, arch, size, n = args.child
        print(json.dumps(child(method, arch, int(size), int(n))))
        return
    rows = []
    print(
        "| series | model | W | N' | N'·W f32 MiB | N'·act MiB | ghost MiB | materialised MiB "
        "| ghost s | mat. s | trace rel. diff |"
    )
    print("|---" * 11 + "|")
    for name in args.series or list(SERIES):
        for arch, size, n in SERIES[name]:
            ghost = point("ghost", arch, size, n, args.threads)
            mat = point("materialize", arch, size, n, args.threads)
            w = ghost["num_params"]
            model = f"wrn-16-{size}" if arch == "wrn" else f"mlp 784-{size}-{size}-10"
            rel = abs(ghost["trace"] - mat["trace"]) / abs(mat["trace"])
            row = {
                "series": name,
                "model": model,
                "num_params": w,
                "n": n,
                "n_w_float32_mib": round(n * w * 4 / MIB, 1),
                "n_activation_mib": round(n * ghost["activation_mib_per_example"], 1),
                "ghost_mib": ghost["peak_over_baseline_mib"],
                "materialize_mib": mat["peak_over_baseline_mib"],
                "ghost_seconds": ghost["seconds"],
                "materialize_seconds": mat["seconds"],
                "trace_rel_diff": rel,
            }
            rows.append(row)
            print(
                f"| {name} | {model} | {w:,} | {n} | {row['n_w_float32_mib']:,} "
                f"| {row['n_activation_mib']:,} | {row['ghost_mib']:,} "
                f"| {row['materialize_mib']:,} | {row['ghost_seconds']} "
                f"| {row['materialize_seconds']} | {rel:.1e} |",
                flush=True,
            )
    print(f"\nworkspace bound: {WORKSPACE * 8 / MIB:.0f} MiB of float64 per layer block")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
