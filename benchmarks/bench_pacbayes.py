"""Benchmark of ``flatcli pacbayes``: bound-optimisation epochs against SGD, batched Monte Carlo.

Epochs: one epoch of the bound optimisation (Wu et al. 2020, Algorithm 1: one weight sample
w′ ~ Q per mini-batch, cross-entropy + sqrt(B_RE/2), RMSprop), ``vanilla`` (posterior diagonal
in the standard basis) and ``approx-hessian`` (diagonal in the per-layer K-FAC eigenbasis; the
noise U N Vᵀ enters on the weights or, when cheaper, on the activations), against one epoch of
plain SGD on the same model, data and batch size. The eigenbasis itself (K-FAC factors and
eigendecompositions, once per run) is timed separately. Each method runs twice: with the
step's elementwise kernels as eager PyTorch ops (the default) and fused by ``torch.compile``
(``--compile``; its one-off compilation is timed separately and not in the epochs). Two floors
are printed beside them:
drawing the step's P standard normals (``Tensor.normal_``, the one cost no implementation that
samples a fresh w′ per step can avoid) and one SGD step, both in ms. Model: T-600
(mlp 784-600-2, 472,202 parameters) on the mnist5k-2 training split (4,000 real digits).

Monte Carlo: the certificate's n weight samples, batched with vmap over functional_call
(``snn_errors``), against a Python loop of single-sample forward passes over the same data
with the same weights (samples per second), on all 4,000 examples and on a 250-example set.

Times are CPU seconds of this process (``time.process_time``), one intra-op thread, rounds
interleaved, minimum kept.

    OMP_NUM_THREADS=1 python benchmarks/bench_pacbayes.py           # about 3 minutes
    OMP_NUM_THREADS=1 python benchmarks/bench_pacbayes.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatcli.pacbayes.montecarlo import deterministic_error, sample_weights, snn_errors  # noqa: E402
from flatcli.pacbayes.optimize import Posterior, optimize_posterior  # noqa: E402
from flatcli.pacbayes.posterior import kfac_basis  # noqa: E402
from flatcli.pacbayes.step import activation_layers  # noqa: E402
from model_zoo import get_model  # noqa: E402


def _data() -> tuple[torch.Tensor, torch.Tensor, str]:
    from flatcli.data import load_dataset

    split = load_dataset("mnist5k-2").split("train")
    return split.x, split.y, "mnist5k-2 train split (4,000 real MNIST digits, 2 classes)"


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def bench_epochs(batch_sizes: list[int], rounds: int) -> dict:
    torch.manual_seed(0)
    model = get_model("mlp", num_classes=2, hidden=[600]).eval()
    x, y, source = _data()
    prior = {k: v.detach() + 0.01 * torch.randn_like(v) for k, v in model.named_parameters()}
    t0 = time.process_time()
    basis = kfac_basis(model, x, y)
    basis_s = time.process_time() - t0

    def sgd_epoch(bs: int) -> None:
        net = get_model("mlp", num_classes=2, hidden=[600])
        net.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        perm = torch.randperm(len(x))
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()

    def pb_epoch(bs: int, method: str, compiled: bool = False) -> None:
        optimize_posterior(
            model,
            x,
            y,
            prior,
            method=method,
            epochs=1,
            batch_size=bs,
            lr=1e-3,
            basis_fn=(lambda mean: basis) if method != "vanilla" else None,
            compile=compiled,
        )

    variants = {
        "vanilla": ("vanilla", False),
        "approx-hessian": ("approx-hessian", False),
        "vanilla+compile": ("vanilla", True),
        "approx-hessian+compile": ("approx-hessian", True),
    }

    xi = torch.empty(sum(p.numel() for p in model.parameters()))
    gen = torch.Generator().manual_seed(0)
    draws = 200
    normal_ms = 1e3 * min(
        _cpu(lambda: [xi.normal_(generator=gen) for _ in range(draws)]) / draws for _ in range(3)
    )
    sgd_epoch(256)  # warm-up: first calls pay for allocation and kernel selection
    t0 = time.perf_counter()
    pb_epoch(256, "vanilla", True)  # the compilation, once (wall clock: it runs a compiler)
    pb_epoch(256, "approx-hessian", True)
    compile_s = time.perf_counter() - t0
    for method, compiled in variants.values():
        pb_epoch(256, method, compiled)
    rows = []
    for bs in batch_sizes:
        best = {name: float("inf") for name in ["sgd", *variants]}
        for _ in range(rounds):
            best["sgd"] = min(best["sgd"], _cpu(lambda bs=bs: sgd_epoch(bs)))
            for name, (method, compiled) in variants.items():
                t = _cpu(lambda bs=bs, m=method, c=compiled: pb_epoch(bs, m, c))
                best[name] = min(best[name], t)
        steps = -(-len(x) // bs)
        rows.append(
            {
                "batch_size": bs,
                "steps": steps,
                "sgd_step_ms": 1e3 * best["sgd"] / steps,
                "approx_noise_on_activations": sorted(
                    activation_layers(model, basis, min(bs, len(x)))
                ),
                "sgd_epoch_s": best["sgd"],
                **{f"{name}_epoch_s": best[name] for name in variants},
                **{f"{name}_ratio": best[name] / best["sgd"] for name in variants},
            }
        )
    return {
        "data": source,
        "model": "mlp 784-600-2",
        "basis_s": basis_s,
        "compile_s": compile_s,
        "normal_draw_ms": normal_ms,
        "rows": rows,
    }


def bench_mc(samples: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = get_model("mlp", num_classes=2, hidden=[600]).eval()
    x, y, _ = _data()
    mean = {k: v.detach() for k, v in model.named_parameters()}
    post = Posterior(mean, {k: torch.full_like(v, -4.0) for k, v in mean.items()}, -3.0)
    rows = []
    for n_ex in (len(x), 250):
        xs, ys = x[:n_ex], y[:n_ex]

        def loop(xs=xs, ys=ys) -> list[float]:
            return [
                deterministic_error(
                    model,
                    {k: v[0] for k, v in sample_weights(post, range(i, i + 1), seed=0).items()},
                    xs,
                    ys,
                )
                for i in range(samples)
            ]

        def batched(xs=xs, ys=ys):
            return snn_errors(model, post, xs, ys, samples=samples, seed=0)

        assert torch.allclose(batched(), torch.tensor(loop(), dtype=torch.float64))
        t_loop = min(_cpu(loop) for _ in range(rounds))
        t_batch = min(_cpu(batched) for _ in range(rounds))
        rows.append(
            {
                "examples": n_ex,
                "samples": samples,
                "loop_samples_per_s": samples / t_loop,
                "batched_samples_per_s": samples / t_batch,
                "speedup": t_loop / t_batch,
            }
        )
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 1 if args.quick else 3
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "epochs": bench_epochs([256] if args.quick else [64, 128, 256, 512, 1024, 2048], rounds),
        "mc": bench_mc(8 if args.quick else 32, rounds),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    e = out["epochs"]
    print(
        f"\nT-600 on {e['data']}; eigenbasis {e['basis_s']:.2f} s (once); compilation "
        f"{e['compile_s']:.1f} s (once); P normals {e['normal_draw_ms']:.2f} ms a step"
    )
    print(
        "| batch | SGD step (ms) | SGD epoch (s) | vanilla | vanilla --compile | approx-hessian "
        "| approx-hessian --compile | approx noise on |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in e["rows"]:
        where = "activations" if r["approx_noise_on_activations"] else "weights"
        ratios = " | ".join(
            f"{r[f'{name}_ratio']:.2f}x"
            for name in ("vanilla", "vanilla+compile", "approx-hessian", "approx-hessian+compile")
        )
        print(
            f"| {r['batch_size']} | {r['sgd_step_ms']:.2f} | {r['sgd_epoch_s']:.3f} | "
            f"{ratios} | {where} |"
        )
    print("\n| examples | samples | loop (samples/s) | batched (samples/s) | speed-up |")
    print("|---|---|---|---|---|")
    for r in out["mc"]["rows"]:
        print(
            f"| {r['examples']} | {r['samples']} | {r['loop_samples_per_s']:.1f} | "
            f"{r['batched_samples_per_s']:.1f} | {r['speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
