"""Transformers, side by side in one run (#23, item 7): an HVP against a gradient, and top-5
eigenvalues against curvlinops.

(i) A small GPT (4 layers, width 128, 4 heads, byte vocabulary of 256, random weights, tied head)
on 8 sequences of 128 tokens, float32, one thread. Timed round-robin, medians of ``--repeats``
after a warm-up, process CPU time and wall time:

  - grad:               ``torch.autograd.grad`` of ``F.cross_entropy`` over the flattened tokens
                        (plain PyTorch, torch's default attention kernel: the baseline);
  - grad (math attention): the same on the math attention kernel, which every second-order
                        product needs (the fused kernels have no double backward);
  - hvp:                ``make_operator("hessian", loss_fn="token-ce").matvec`` as Lanczos calls
                        it (automatic method and chunk; the graph kept between products);
  - hvp uncached:       the same with ``cache=False`` (a first product: graph built, then one
                        more backward pass);
  - hvp f64 head (+ uncached): the same with the float64 head the commands use by default;
  - plain torch double backward (uncached): ``torch.autograd.grad`` with ``create_graph=True``
                        then one more backward, hand-written: what an uncached product costs
                        without flatcli.

Claim: one HVP at most 3x a gradient.

(ii) Top-5 Hessian eigenvalues (largest algebraic), flatcli vs curvlinops, same model, loss, data
and float32 products, on a tiny ViT (Conv2d patches, one ``nn.TransformerEncoderLayer``,
LayerNorm, Linear head; 3,466 parameters; 512 random 3x16x16 images, 10 random classes) and on
the small GPT. flatcli: ``make_operator("hessian")`` + ``flatcli.curvature.lanczos.lanczos(op,
5, tol)`` (float32 head, as curvlinops). curvlinops: ``HessianLinearOperator(model,
CrossEntropyLoss(), params, [(x, y)], check_deterministic=False).to_scipy(numpy.float64)`` +
``scipy.sparse.linalg.eigsh(k=5, which="LA", tol)``. Both with the same tolerance, timed from
the operator's construction to the eigenvalues; the attention runs on the math kernel for both
(torch's fused kernels have no second derivatives, which flatcli detects and curvlinops does
not). A float64 reference (flatcli Lanczos on a float64 copy, tol 1e-10) says how accurate each is.

    OMP_NUM_THREADS=1 python benchmarks/bench_transformer_speed.py           # ~3 min
    OMP_NUM_THREADS=1 python benchmarks/bench_transformer_speed.py --quick   # 3 repeats
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpt_scale import GPT, token_data  # noqa: E402

from flatcli.curvature._functional import attention_kernel  # noqa: E402
from flatcli.curvature.lanczos import lanczos  # noqa: E402
from flatcli.curvature.operators import make_operator  # noqa: E402

SMALL_GPT = dict(vocab=256, width=128, layers=4, heads=4, context=128)


class TinyViT(nn.Module):
    """Patch embedding (Conv2d 4x4, stride 4), a learned position embedding, one
    ``nn.TransformerEncoderLayer`` (width 16, 2 heads, MLP 32, GELU), LayerNorm, mean pooling
    and a Linear head: (N, 3, 16, 16) -> (N, 10). 3,466 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(16, 16) * 0.02)
        self.enc = nn.TransformerEncoderLayer(
            16, 2, dim_feedforward=32, dropout=0.0, activation="gelu", batch_first=True
        )
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (N, 16 patches, 16)
        return self.head(self.norm(self.enc(h)).mean(1))


class FlatTokens(nn.Module):
    """(N, T, V) logits as (N T, V) rows, so ``nn.CrossEntropyLoss()`` is token-ce's mean over
    all positions."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x)
        return z.reshape(-1, z.shape[-1])


def _timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (CPU s, wall s) of each function, run round-robin after one warm-up each."""
    for fn in fns.values():
        fn()
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


def hvp_vs_grad(repeats: int) -> None:
    torch.manual_seed(0)
    model = GPT(**SMALL_GPT).eval()
    x, y = token_data(SMALL_GPT["vocab"], 8, 128)
    params = [p for p in model.parameters()]
    dim = sum(p.numel() for p in params)

    def gradient() -> object:
        z = model(x)
        return torch.autograd.grad(
            F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1)), params
        )

    ops = {
        "hvp": make_operator("hessian", model, x, y, loss_fn="token-ce"),
        "hvp uncached": make_operator("hessian", model, x, y, loss_fn="token-ce", cache=False),
        "hvp f64 head": make_operator(
            "hessian", model, x, y, loss_fn="token-ce", head_dtype=torch.float64
        ),
        "hvp f64 head uncached": make_operator(
            "hessian", model, x, y, loss_fn="token-ce", head_dtype=torch.float64, cache=False
        ),
    }

    def gradient_math() -> object:
        with attention_kernel("math"):
            return gradient()

    def plain_hvp() -> object:
        """Hand-written PyTorch double backward, graph built each time: the floor an uncached
        product can reach without changing the model's derivative formulas."""
        with attention_kernel("math"):
            z = model(x)
            loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))
            g = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((gi * vi).sum() for gi, vi in zip(g, vs, strict=True))
            return torch.autograd.grad(dot, params)

    v = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    vs = [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params, strict=True)]
    fns: dict[str, Callable[[], object]] = {
        "grad": gradient,
        "grad (math attention)": gradient_math,
        "plain torch double backward (uncached)": plain_hvp,
    }
    fns.update({name: (lambda op=op: op.matvec(v)) for name, op in ops.items()})
    times = _timed(fns, repeats)
    op = ops["hvp"]
    print(
        f"\n(i) small GPT, {dim:,} parameters, 8 x 128 tokens, float32, "
        f"{torch.get_num_threads()} thread(s); operator: {op.hvp_method}, chunk "
        f"{op.batch_size}, attention {op.attention}; medians of {repeats}"
    )
    print("| product | CPU ms | wall ms | / grad (CPU) | / grad (wall) |")
    print("|---|---:|---:|---:|---:|")
    gc, gw = times["grad"]
    for name, (c, w) in times.items():
        print(f"| {name} | {1e3 * c:.1f} | {1e3 * w:.1f} | {c / gc:.2f} | {w / gw:.2f} |")


def _vit_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, 16, 16, generator=g)
    return TinyViT().eval(), x, torch.randint(0, 10, (512,), generator=g)


def _gpt_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    x, y = token_data(SMALL_GPT["vocab"], 8, 128)
    return GPT(**SMALL_GPT).eval(), x, y


def _flatcli_top(model: nn.Module, x: Tensor, y: Tensor, loss: str, k: int, tol: float) -> dict:
    c, w = time.process_time(), time.perf_counter()
    op = make_operator("hessian", model, x, y, loss_fn=loss)
    res = lanczos(op, k, tol=tol)
    return {
        "eig": res.eigenvalues.numpy(),
        "hvps": op.matvecs,
        "cpu": time.process_time() - c,
        "wall": time.perf_counter() - w,
    }


def _curvlinops_top(
    model: nn.Module, x: Tensor, y: Tensor, tokens: bool, k: int, tol: float
) -> dict:
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    net = FlatTokens(model) if tokens else model
    target = y.reshape(-1) if tokens else y
    params = [p for p in net.parameters() if p.requires_grad]
    with attention_kernel("math"):
        c, w = time.process_time(), time.perf_counter()
        H = HessianLinearOperator(
            net, nn.CrossEntropyLoss(), params, [(x, target)], check_deterministic=False
        ).to_scipy(np.float64)
        count = [0]

        def mv(v: np.ndarray) -> np.ndarray:
            count[0] += 1 if v.ndim == 1 else v.shape[1]
            return H.matvec(v) if v.ndim == 1 else H.matmat(v)

        A = LinearOperator(H.shape, matvec=mv, dtype=np.float64)
        eig = eigsh(A, k=k, which="LA", tol=tol, return_eigenvectors=False)
        cpu, wall = time.process_time() - c, time.perf_counter() - w
    return {"eig": np.sort(eig)[::-1], "hvps": count[0], "cpu": cpu, "wall": wall}


def top_k(k: int, tol: float, repeats: int) -> None:
    print(
        f"\n(ii) top-{k} Hessian eigenvalues, tol {tol}, float32 products; "
        f"best of {repeats} runs each (CPU s)"
    )
    print(
        "| model | params | tool | HVPs | CPU s | wall s | flatcli / curvlinops (CPU) "
        "| max rel. error vs float64 |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, make, loss in (
        ("tiny ViT", _vit_problem, "ce"),
        ("small GPT", _gpt_problem, "token-ce"),
    ):
        model, x, y = make()
        dim = sum(p.numel() for p in model.parameters())
        ref_op = make_operator(
            "hessian",
            copy.deepcopy(model).double(),
            x.double() if x.is_floating_point() else x,
            y,
            loss_fn=loss,
        )
        ref = lanczos(ref_op, k, tol=1e-10).eigenvalues.numpy()
        runs: dict[str, list[dict]] = {"flatcli": [], "curvlinops": []}
        for _ in range(repeats):  # alternate, so both see the same machine load
            runs["flatcli"].append(_flatcli_top(model, x, y, loss, k, tol))
            runs["curvlinops"].append(_curvlinops_top(model, x, y, loss == "token-ce", k, tol))
        best = {tool: min(rs, key=lambda r: r["cpu"]) for tool, rs in runs.items()}
        for tool, r in best.items():
            err = float(np.max(np.abs(r["eig"] - ref) / np.abs(ref)))
            ratio = best["flatcli"]["cpu"] / best["curvlinops"]["cpu"]
            print(
                f"| {name} | {dim:,} | {tool} | {r['hvps']} | {r['cpu']:.2f} | {r['wall']:.2f} "
                f"| {ratio:.2f} | {err:.1e} |"
            )
        print(f"  {name} float64 reference: {np.array2string(ref, precision=6)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=11, help="timed repeats of (i)")
    p.add_argument("--runs", type=int, default=3, help="runs of each tool in (ii)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="3 repeats, 1 run each")
    p.add_argument("--only", choices=("hvp", "topk"), default=None)
    args = p.parse_args()
    if args.quick:
        args.repeats, args.runs = 3, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, load average {os.getloadavg()}")
    if args.only in (None, "hvp"):
        hvp_vs_grad(args.repeats)
    if args.only in (None, "topk"):
        top_k(args.k, args.tol, args.runs)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
