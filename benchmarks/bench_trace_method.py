"""``hessian_trace`` on a language model: ``--trace-method auto`` against ``ggn-residual`` (#23).

Claim: the default ``sharpness --measure hessian_trace`` finishes in seconds on the zoo's
``gpt-tiny`` (125k parameters, 64 bytes per sequence, vocabulary 256), where the previous
default ``ggn-residual`` spent about 19 s per sequence on its exact GGN trace (T·V = 16,384
backward rows per sequence). In one process, with one thread and the same random-weight model
and sequences (``python-license``, the first ``--sequences`` training windows):

- baseline: one gradient pass (forward and backward of the mean token-ce) over the sequences,
  best of 3;
- ``auto`` (what it picked, its reason, value ± stderr), and ``ggn-residual``;
- each method's up-front estimate (``details["estimated_seconds"]``) beside its measured time.

    OMP_NUM_THREADS=1 python benchmarks/bench_trace_method.py                # ~1 min
    OMP_NUM_THREADS=1 python benchmarks/bench_trace_method.py --sequences 8  # ~3 min
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from flatcli.data.registry import load_dataset  # noqa: E402
from flatcli.measures.sharpness import SharpnessConfig, compute_sharpness  # noqa: E402
from model_zoo import get_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("python-license", seq_len=64)
    x, y = data.train.x[: args.sequences], data.train.y[: args.sequences]
    torch.manual_seed(0)
    model = get_model("gpt-tiny", num_classes=256).eval()
    params = [q for q in model.parameters() if q.requires_grad]

    def gradient() -> float:
        start = time.perf_counter()
        z = model(x)
        torch.autograd.grad(F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)), params)
        return time.perf_counter() - start

    base = min(gradient() for _ in range(3))
    print(
        f"gpt-tiny, {sum(q.numel() for q in params):,} parameters, {args.sequences} sequences "
        f"of 64 bytes, {torch.get_num_threads()} thread(s), torch {torch.__version__}; one "
        f"gradient pass {1e3 * base:.1f} ms"
    )
    print("| --trace-method | ran | tr(H) ± stderr | estimate s | s | / gradient pass |")
    print("|---|---|---:|---:|---:|---:|")
    for method in ("auto", "ggn-residual"):
        config = SharpnessConfig(measures=("hessian_trace",), loss="token-ce", trace_method=method)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cost line; its number is printed below
            res = compute_sharpness(model, x, y, config)
        took = time.perf_counter() - start
        settings, metrics = res.settings["hessian_trace"], res.metrics()
        print(
            f"| {method} | {settings['trace_method']} | {metrics['hessian_trace']:.4g} ± "
            f"{metrics['hessian_trace_stderr']:.3g} | {res.info['estimated_seconds']:.1f} | "
            f"{took:.1f} | {took / base:.0f} |"
        )
        if "trace_method_reason" in settings:
            print(f"  ({settings['trace_method_reason']})")


if __name__ == "__main__":
    main()
