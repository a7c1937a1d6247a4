"""The K-FAC Hessian experiment of docs/experiments.md ("Dissecting Hessian" on mnist5k).

For each checkpoint ``<arch>-s<seed>.safetensors`` in a folder (trained by ``flatcli train``),
:func:`flatcli.measures.kfac.compute_kfac` measures every layer once (factors, exact top-K
block by Lanczos, decoupling error) on the same N training examples; the cross-seed overlaps
(Fig. 5) come from the stored eigenvectors (:func:`flatcli.measures.kfac.cross_overlaps`), so
no checkpoint is measured twice. Prints Markdown tables and writes the raw numbers as JSON.

    python benchmarks/experiment_kfac.py RUNS_DIR --archs mlp lenet5 lenet5-bn --seeds 0 1 2 \\
        --examples 500 --top-k 30 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flatcli  # noqa: E402
from flatcli.measures.kfac import KfacConfig, compute_kfac, cross_overlaps  # noqa: E402


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.{digits}f}"


def _ms(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return _fmt(vals[0])
    return f"{_fmt(statistics.mean(vals))} ± {_fmt(statistics.stdev(vals), 2)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--archs", nargs="+", default=["mlp", "lenet5", "lenet5-bn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument(
        "--split", default="train", help="train, or trained: the examples each net trained on"
    )
    parser.add_argument("--top-k", type=int, default=30)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--from-json", type=Path, help="print the tables of a saved --json file (no measuring)"
    )
    args = parser.parse_args()
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        for arch, a in raw["archs"].items():
            _tables(arch, a["layers"], a["pairs"], raw["config"]["top_k"])
        return
    torch.set_num_threads(1)
    config = KfacConfig(top_k=args.top_k, probes=args.probes)
    raw: dict = {
        "config": config.to_dict(),
        "examples": args.examples,
        "split": args.split,
        "archs": {},
    }
    for arch in args.archs:
        results = {}
        for seed in args.seeds:
            path = args.runs / f"{arch}-s{seed}.safetensors"
            if not path.exists():
                continue
            run = flatcli.load(path, split=args.split, max_examples=args.examples, seed=0)
            t = time.perf_counter()
            results[seed] = compute_kfac(run.model, run.x, run.y, config)
            rec = run.record or {}
            print(
                f"# {arch} seed {seed}: {time.perf_counter() - t:.0f} s, train acc "
                f"{rec.get('train_acc', rec.get('metrics', {}).get('train_acc'))}",
                file=sys.stderr,
            )
        if not results:
            print(f"# {arch}: no checkpoints in {args.runs}", file=sys.stderr)
            continue
        pairs = {
            f"{a}-{b}": cross_overlaps(results[a], results[b])
            for a, b in itertools.combinations(sorted(results), 2)
        }
        raw["archs"][arch] = {
            "layers": {s: r.details()["layers"] for s, r in results.items()},
            "metrics": {s: r.metrics() for s, r in results.items()},
            "pairs": pairs,
        }
        _tables(arch, {s: r.details()["layers"] for s, r in results.items()}, pairs, args.top_k)
    if args.json:
        args.json.write_text(json.dumps(raw))


def _tables(arch: str, layers: dict, pairs: dict, K: int) -> None:
    seeds = sorted(layers)
    names = [e["name"] for e in layers[seeds[0]]]
    by = {s: {e["name"]: e for e in layers[s]} for s in seeds}
    print(f"\n### {arch} ({len(seeds)} seeds: mean ± sd)\n")
    print(
        "| layer | m × n (P) | ‖E[x]E[x]ᵀ‖/‖Σ_x‖ (Eq. 8) | \\|⟨Ê[x], v₁⟩\\| | overlap k=1 | k=5 | "
        f"k=10 | k={K} | decoupling error | σ₁/‖h₁‖_F | gap E[M] / H |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        e0 = by[seeds[0]][n]
        col = {
            key: [by[s][n][key] for s in seeds]
            for key in ("spectral_ratio", "mean_alignment", "decoupling_error")
        }
        ov = [
            [by[s][n]["overlap"][min(k, len(by[s][n]["overlap"])) - 1] for s in seeds]
            for k in (1, 5, 10, K)
        ]
        r1 = [by[s][n]["rank1_scores"][0] for s in seeds]
        gaps = ", ".join(
            f"{by[s][n]['em_outlier_gap']}/{by[s][n]['exact_outlier_gap']}" for s in seeds
        )
        m, nn_ = e0["shape"]
        print(
            f"| {n} | {m} × {nn_} ({e0['positions']}) | {_ms(col['spectral_ratio'])} | "
            f"{_ms(col['mean_alignment'])} | {_ms(ov[0])} | {_ms(ov[1])} | {_ms(ov[2])} | "
            f"{_ms(ov[3])} | {_ms(col['decoupling_error'])} | {_ms(r1)} | {gaps} |"
        )
    print("\nTop eigenvalues: exact block vs E[M] ⊗ E[xxᵀ] (Fig. 2a, Fig. 4)\n")
    print(
        "| layer | λ₁ exact | λ₁ K-FAC / exact | Σ top-10 K-FAC / exact | mean σ₁/‖h‖_F, top 10 "
        "| E[M] gap (each seed) |"
    )
    print("|---|---|---|---|---|---|")
    for n in names:
        ex = [by[s][n]["exact_eigenvalues"] for s in seeds]
        kr = [by[s][n]["kron_eigenvalues"] for s in seeds]
        r1 = [statistics.mean(by[s][n]["rank1_scores"][:10]) for s in seeds]
        pairs_ = list(zip(kr, ex, strict=True))
        top1 = _ms([k[0] / e[0] for k, e in pairs_])
        top10 = _ms([sum(k[:10]) / sum(e[:10]) for k, e in pairs_])
        print(
            f"| {n} | {_ms([e[0] for e in ex])} | {top1} | {top10} | {_ms(r1)} | "
            f"{', '.join(str(by[s][n]['em_outlier_gap']) for s in seeds)} |"
        )
    if not pairs:
        return
    print(f"\nCross-seed overlap of the exact top-k eigenspaces ({len(pairs)} pairs; Fig. 5)\n")
    print("| layer | m | k=1 | k=m/2 | k=m | k=2m | peak k | K-FAC at k=m | (Ê[x]₁ᵀÊ[x]₂)² |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        cs = [p[n] for p in pairs.values()]
        m = cs[0]["m"]

        def at(k: int, key: str = "exact_overlap", cs=cs) -> str:
            vals = [c[key][k - 1] for c in cs if k <= len(c[key])]
            return _ms(vals) if vals else "–"

        peaks = ", ".join(str(c["exact_overlap_peak_k"]) for c in cs)
        print(
            f"| {n} | {m} | {at(1)} | {at(max(1, m // 2))} | {at(m)} | {at(2 * m)} | {peaks} | "
            f"{at(m, 'kron_overlap')} | {_ms([c['predicted_overlap_at_m'] for c in cs])} |"
        )


if __name__ == "__main__":
    main()
