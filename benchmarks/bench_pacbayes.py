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

Monte Carlo on LeNet-5 (the README's network, 61,706 parameters) over 2,000 mnist5k digits
(the bound's half of the default data-dependent split): ms per weight sample of ``snn_errors``
with its default chunking, with the chunking it had before (16 samples vmapped over 1,024
digits), and with 4 and 16 samples vmapped over the default data chunk, each against the
forward-pass floor measured in the same run: the model's own forward (one fixed weight set,
no sampling) over the same digits at its best batch size (128, 256 or 512). And one epoch of
the f-quad posterior optimisation (one weight sample a step through autograd, Adam) against
one SGD epoch of the same LeNet-5 on all 4,000 digits at the same batch size.

Times are CPU seconds of this process (``time.process_time``), one intra-op thread, rounds
interleaved, minimum kept.

    OMP_NUM_THREADS=1 python benchmarks/bench_pacbayes.py           # about 5 minutes
    OMP_NUM_THREADS=1 python benchmarks/bench_pacbayes.py --quick
    OMP_NUM_THREADS=1 python benchmarks/bench_pacbayes.py --only lenet   # about 2 minutes
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


def bench_mc_lenet(samples: int, rounds: int) -> dict:
    from flatcli.data import load_dataset
    from flatcli.pacbayes.montecarlo import _activation_elements, chunk_sizes

    torch.manual_seed(0)
    model = get_model("lenet5", num_classes=10).eval()
    split = load_dataset("mnist5k").split("train")
    x, y = split.x[:2000], split.y[:2000]
    mean = {k: v.detach() for k, v in model.named_parameters()}
    post = Posterior(mean, {k: torch.full_like(v, -3.5) for k, v in mean.items()}, -3.5)
    act = _activation_elements(model, x[:1])
    _, auto_d = chunk_sizes(model, post.num_params(), len(x), samples, activations=act)

    @torch.no_grad()
    def floor_at(bs: int) -> None:
        for _ in range(samples):
            for a in range(0, len(x), bs):
                model(x[a : a + bs]).argmax(-1)

    floors = {
        bs: min(_cpu(lambda bs=bs: floor_at(bs)) for _ in range(rounds)) for bs in (128, 256, 512)
    }
    best_bs = min(floors, key=floors.get)
    floor_ms = 1e3 * floors[best_bs] / samples
    variants = {
        "default": {},
        "previous default (16 x 1024, vmap)": {"sample_chunk": 16, "data_chunk": 1024},
        f"vmap 4 x {auto_d}": {"sample_chunk": 4, "data_chunk": auto_d},
        f"vmap 16 x {auto_d}": {"sample_chunk": 16, "data_chunk": auto_d},
    }
    ref = snn_errors(model, post, x, y, samples=samples, seed=0)
    rows = []
    for name, kw in variants.items():
        errs = snn_errors(model, post, x, y, samples=samples, seed=0, **kw)
        assert torch.equal(errs, ref), name  # the same numbers whatever the chunking
        t = min(
            _cpu(lambda kw=kw: snn_errors(model, post, x, y, samples=samples, seed=0, **kw))
            for _ in range(rounds)
        )
        ms = 1e3 * t / samples
        rows.append({"variant": name, "ms_per_sample": ms, "ratio_to_floor": ms / floor_ms})
    return {
        "model": "lenet5 (61,706 parameters)",
        "examples": len(x),
        "samples": samples,
        "activation_elements_per_example": act,
        "default_chunks": [1, auto_d],
        "floor_batch": best_bs,
        "floor_ms_per_sample": floor_ms,
        "floors_ms": {bs: 1e3 * t / samples for bs, t in floors.items()},
        "rows": rows,
    }


def bench_fquad_epochs(batch_sizes: list[int], rounds: int) -> dict:
    """One f-quad epoch (autograd through one weight sample a step, Adam) against one SGD epoch
    of the same LeNet-5 on the same 4,000 mnist5k digits and batch size."""
    from flatcli.data import load_dataset
    from flatcli.pacbayes.fquad import optimize_fquad

    torch.manual_seed(0)
    model = get_model("lenet5", num_classes=10).eval()
    split = load_dataset("mnist5k").split("train")
    x, y = split.x, split.y
    prior = {k: v.detach().clone() for k, v in model.named_parameters()}

    def sgd_epoch(bs: int) -> None:
        net = get_model("lenet5", num_classes=10)
        net.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        perm = torch.randperm(len(x))
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()

    def fquad_epoch(bs: int) -> None:
        optimize_fquad(model, x, y, prior, num_train=2000, epochs=1, batch_size=bs)

    sgd_epoch(256)
    fquad_epoch(256)
    rows = []
    for bs in batch_sizes:
        t_sgd = min(_cpu(lambda bs=bs: sgd_epoch(bs)) for _ in range(rounds))
        t_fq = min(_cpu(lambda bs=bs: fquad_epoch(bs)) for _ in range(rounds))
        rows.append(
            {"batch_size": bs, "sgd_epoch_s": t_sgd, "fquad_epoch_s": t_fq, "ratio": t_fq / t_sgd}
        )
    return {"model": "lenet5", "examples": len(x), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", choices=["lenet"], help="only the LeNet-5 parts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = 1 if args.quick else 3
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out["lenet_mc"] = bench_mc_lenet(4 if args.quick else 16, rounds)
    out["fquad"] = bench_fquad_epochs([250] if args.quick else [64, 250, 1000], rounds)
    if args.only is None:
        batches = [256] if args.quick else [64, 128, 256, 512, 1024, 2048]
        out["epochs"] = bench_epochs(batches, rounds)
        out["mc"] = bench_mc(8 if args.quick else 32, rounds)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    lm = out["lenet_mc"]
    print(
        f"\nLeNet-5 Monte Carlo over {lm['examples']} digits, {lm['samples']} samples; floor "
        f"(plain forward at batch {lm['floor_batch']}): {lm['floor_ms_per_sample']:.1f} ms a sample"
    )
    print("| chunking | ms per sample | × floor |")
    print("|---|---|---|")
    for r in lm["rows"]:
        print(f"| {r['variant']} | {r['ms_per_sample']:.1f} | {r['ratio_to_floor']:.2f}x |")
    print("\nf-quad epoch vs SGD epoch, LeNet-5 on 4,000 mnist5k digits")
    print("| batch | SGD epoch (s) | f-quad epoch (s) | ratio |")
    print("|---|---|---|---|")
    for r in out["fquad"]["rows"]:
        print(
            f"| {r['batch_size']} | {r['sgd_epoch_s']:.2f} | {r['fquad_epoch_s']:.2f} | "
            f"{r['ratio']:.2f}x |"
        )
    if args.only is not None:
        return
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
