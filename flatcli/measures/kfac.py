"""Does the decoupling conjecture hold, layer by layer? (Wu et al. 2020, "Dissecting Hessian").

For every selected Linear/Conv2d layer this measure forms the Kronecker factors E[M] and
E[xxᵀ] (:func:`flatcli.curvature.kfac.kfac_factors`: one pass over the examples, E[M] exact)
and compares E[M] ⊗ E[xxᵀ] with the exact layer block of the Hessian (the curvature core's
operator restricted to the layer's weight, the other layers' entries zero; top-k eigenpairs by
Lanczos, Wu et al. 2020, App. C):

- the factors' spectra, the top-k eigenvalues of the Kronecker product (merged products
  λ_i μ_j, App. C) and of the exact block;
- the top-k eigenspace overlap, Overlap(U, V) = ‖UᵀV‖_F²/k (Def. 4.1, Eq. 7), for k = 1..K
  (Fig. 2);
- the eigenvector correspondence matrices Corr(u_i, h_j) = ‖Mat(h_j)ᵀu_i‖² and
  Corr(v_i, h_j) = ‖Mat(h_j)v_i‖² (§4.2, Fig. 3), for the exact and the Kronecker eigenvectors;
- the structure of E[xxᵀ]: ‖E[x]E[x]ᵀ‖/‖Σ_x‖ (Eq. 8, Table 6) and |⟨Ê[x], v₁⟩| (Table 7);
- σ₁/‖·‖_F of Mat(h_i) for the exact top eigenvectors (§5.2, Fig. 6);
- where the spectra of E[M] and of the block have their largest gap (about c outliers, §4.4);
- the decoupling error ‖H − E[M] ⊗ E[xxᵀ]‖_F / ‖H‖_F with a standard error (matrix-free,
  Rademacher probes; not in the paper);
- with ``compare``: the overlap between the top-k eigenspaces of two checkpoints' blocks (exact,
  and from the factors) beside the prediction (Ê[x]₁ᵀÊ[x]₂)² at k = m (§5.1, Thm. E.1, Fig. 5).

Conventions (also in every report): weights flattened as ``weight.flatten()`` (Mat(h) is m × n,
Def. 4.2 with index (i−1)n + j); a convolution's E[M̃] carries the 1/P of Eq. 35 and its
E[XXᵀ] is summed over the P positions (Eq. 37); E[M] is the Gauss-Newton form GᵀAG (Eq. 23),
the exact output Hessian for piecewise-linear networks. BatchNorm runs with its running
statistics (eval mode, App. B.2); its own affine parameters are not Kronecker-factored.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatcli import progress as _progress
from flatcli.configs.kfac import KfacConfig
from flatcli.curvature.kfac import (
    LayerFactors,
    correspondence,
    decoupling_error,
    eigenbasis_coefficients,
    input_structure,
    kfac_factors,
    kron_top,
    outlier_gap,
    overlap_curve,
    rank1_scores,
)
from flatcli.curvature.lanczos import lanczos
from flatcli.curvature.losses import infer_loss
from flatcli.curvature.operators import make_operator
from flatcli.errors import UsageError
from flatcli.measures._config import finite_or_none as _finite_or_none
from flatcli.measures._config import floats as _floats
from flatcli.progress import WARN_SECONDS, Budget, ProgressFn, format_seconds

__all__ = [
    "KfacConfig",
    "LayerReport",
    "KfacResult",
    "compute_kfac",
    "cross_overlaps",
    "load_compare_model",
    "CONVENTIONS",
]

F64 = torch.float64
OVERLAP_AT = 10
"""k of the flat metric ``overlap_at_10_min`` (the top-10 eigenspace; K if K < 10)."""

CONVENTIONS = {
    "flatten": "weight.flatten(): Mat(h) is the m x n matrix with h[(i-1)n + j] = Mat(h)[i, j] "
    "(Wu et al. 2020, Def. 4.2); the approximation is E[M] (x) E[xx^T]",
    "conv": "E[M~] = (1/P) N~^T N~ (Wu et al. 2020, Eq. 35); E[XX^T] summed over the P "
    "positions (Eq. 37); other libraries place the factor P elsewhere",
    "em": "Gauss-Newton form G^T A G of Eq. 23 with A = diag(p) - pp^T exact; equals the output "
    "Hessian for piecewise-linear networks (ReLU, max pooling, eval-mode BatchNorm)",
    "exact_block": "the layer's diagonal block of the Hessian of the mean loss (other layers' "
    "entries zero), top-k by Lanczos",
    "spectral_ratio": "||E[x]E[x]^T||_2 / ||Sigma_x||_2 (Eq. 8); for a convolution x is the "
    "unfolded patch at a uniformly drawn position",
    "batchnorm": "running statistics (eval mode); BatchNorm affine parameters are not "
    "Kronecker-factored",
}


@dataclass
class _Block:
    """One model's analysis of one layer (kept for ``compare``)."""

    factors: LayerFactors
    lam: Tensor
    U: Tensor
    mu: Tensor
    V: Tensor
    exact_values: Tensor
    exact_vectors: Tensor  # (mn, K) float64
    residuals: Tensor
    kron_values: Tensor
    kron_i: Tensor
    kron_j: Tensor
    converged: bool
    matvecs: int


@dataclass
class LayerReport:
    """Everything measured for one layer: ``to_dict()`` is its ``details.layers`` entry."""

    entry: dict[str, Any]

    @property
    def name(self) -> str:
        return self.entry["name"]

    def to_dict(self) -> dict[str, Any]:
        return self.entry


@dataclass
class KfacResult:
    """What :func:`compute_kfac` measured, per layer and as flat metrics."""

    config: KfacConfig
    layers: list[LayerReport]
    examples: int
    not_factored: list[str]
    mode: str
    seconds_factors: float
    compare_checkpoint: str | None = None
    blocks: dict[str, _Block] = field(default_factory=dict, repr=False)
    skipped_layers: dict[str, str] = field(default_factory=dict)

    def _values(self, key: str) -> list[float]:
        out = []
        for layer in self.layers:
            v = layer.entry.get(key)
            if v is not None and math.isfinite(v):
                out.append(float(v))
        return out

    def metrics(self) -> dict[str, float | int | None]:
        """Worst-layer summaries: the decoupling error, overlap at k = 10, E[xxᵀ] structure."""
        at10 = []
        for layer in self.layers:
            ov = layer.entry["overlap"]
            if ov:
                at10.append(ov[min(OVERLAP_AT, len(ov)) - 1])
        rank1 = [
            layer.entry["rank1_scores"][0] for layer in self.layers if layer.entry["rank1_scores"]
        ]
        out: dict[str, float | int | None] = {
            "kfac_layers": len(self.layers),
            "decoupling_error_max": _max(self._values("decoupling_error")),
            "overlap_at_10_min": _min(at10),
            "spectral_ratio_min": _min(self._values("spectral_ratio")),
            "mean_alignment_min": _min(self._values("mean_alignment")),
            "rank1_score_min": _min(rank1),
        }
        if self.config.compare is not None or any("compare" in x.entry for x in self.layers):
            at_m = [
                layer.entry["compare"]["exact_overlap_at_m"]
                for layer in self.layers
                if layer.entry.get("compare") is not None
            ]
            out["compare_overlap_at_m_min"] = _min([v for v in at_m if v is not None])
        return {k: _finite_or_none(v) for k, v in out.items()}

    def details(self) -> dict[str, Any]:
        """Per-layer entries (``details.layers``, the documented report keys) and the conventions
        used."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "conventions": CONVENTIONS,
            "fisher": self.config.fisher,
            "matrix": self.config.matrix,
            "top_k": self.config.top_k,
            "examples": self.examples,
            "mode": self.mode,
            "not_factored": self.not_factored,
            "skipped_layers": self.skipped_layers,
            "compare": self.compare_checkpoint,
            "seconds_factors": self.seconds_factors,
            **self._nonfinite(),
        }

    def _nonfinite(self) -> dict[str, Any]:
        """``{"nonfinite": {metric: reason}}`` for a null ``compare_overlap_at_m_min`` whose
        layers all lack the overlap at k = m (m > --top-k), else nothing."""
        compared = [x.entry["compare"] for x in self.layers if x.entry.get("compare")]
        if not compared or self.metrics().get("compare_overlap_at_m_min") is not None:
            return {}
        small = min(c["m"] for c in compared)
        if small <= self.config.top_k:
            return {}
        why = (
            f"m > top-k: every layer's output size m exceeds --top-k {self.config.top_k} "
            f"(smallest m = {small}); rerun with --top-k {small} or more"
        )
        return {"nonfinite": {"compare_overlap_at_m_min": why}}


def _min(v: list[float]) -> float | None:
    return min(v) if v else None


def _max(v: list[float]) -> float | None:
    return max(v) if v else None


def _analyse(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: KfacConfig,
    progress: ProgressFn,
    tag: str = "",
) -> tuple[dict[str, LayerFactors], dict[str, _Block], dict[str, Any], float]:
    """Factors, exact top-k blocks and the decoupling error of every selected layer."""
    import time

    start = time.perf_counter()
    loss = config.loss or infer_loss(y)
    factors = kfac_factors(
        model,
        x,
        y,
        layers=config.layers,
        fisher=config.fisher,
        batch_size=config.batch_size,
        seed=config.seed,
        progress=lambda d, a, b: progress(f"{tag}kfac factors", a, b),
        mc_samples=config.mc_samples,
        loss=loss,
    )
    seconds = time.perf_counter() - start
    weights = [f"{name}.weight" if name else "weight" for name in factors]
    op = make_operator(
        config.matrix,
        model,
        x,
        y,
        params=weights,
        batch_size=config.batch_size,
        head_dtype=F64,
        seed=config.seed,
        loss_fn=loss,
    )
    blocks: dict[str, _Block] = {}
    errors: dict[str, Any] = {}
    dims = [op.restrict([w]).dim for w in weights]
    ks = [min(config.top_k, d) for d in dims]
    budgets = [
        config.lanczos_steps or min(d, max(3 * k + 20, 60)) for d, k in zip(dims, ks, strict=True)
    ]
    total = sum(budgets) + config.probes * len(factors)
    unit = f"{config.matrix} layer-block products"
    _say_cost([op.restrict([w]) for w in weights], budgets, config, unit)
    budget = Budget(
        lambda d, a, b: progress(f"{tag}{d}", a, b),
        "kfac",
        total,
        unit=unit,
        cheaper=_CHEAPER,
        warn_seconds=math.inf,  # said up front by _say_cost, timed layer by layer
        may_stop_early=True,
    )
    for i, (name, f) in enumerate(factors.items()):
        block = op.restrict([weights[i]])
        k, steps = ks[i], budgets[i]
        eig = lanczos(
            block,
            k,
            "largest",
            steps=steps,
            tol=config.tol,
            seed=config.seed,
            return_vectors=True,
            progress=budget.stage(name, steps + config.probes),
        )
        err, se, probes = decoupling_error(block, f, probes=config.probes, seed=config.seed + 1)
        lam, U, mu, V = f.eig()
        kv, ki, kj = kron_top(lam, mu, k)
        assert eig.eigenvectors is not None
        blocks[name] = _Block(
            factors=f,
            lam=lam,
            U=U,
            mu=mu,
            V=V,
            exact_values=eig.eigenvalues.to(F64),
            exact_vectors=eig.eigenvectors.detach().to(F64).to(f.em.device),
            residuals=eig.residuals,
            kron_values=kv,
            kron_i=ki,
            kron_j=kj,
            converged=eig.converged,
            matvecs=eig.matvecs + probes,
        )
        errors[name] = (err, se, probes)
    budget.finish()
    op.release()
    return factors, blocks, errors, seconds


_CHEAPER = "--max-examples, --layers, a smaller --top-k or fewer --probes"


def _say_cost(blocks: list[Any], budgets: list[int], config: KfacConfig, unit: str) -> None:
    """Warn when the layers' products may take over :data:`WARN_SECONDS`: one product of each
    block is timed (after a first that builds the shared graphs), times its budget."""
    if not blocks:
        return
    g = torch.Generator().manual_seed(config.seed)

    def product(block: Any) -> float:
        v = torch.randn(block.dim, generator=g, dtype=torch.float64)
        start = _progress.clock()
        block.matvec(v.to(block.dtype).to(block.device))
        return _progress.clock() - start

    product(blocks[0])
    seconds = [
        product(b) * (steps + config.probes) for b, steps in zip(blocks, budgets, strict=True)
    ]
    estimate = sum(seconds)
    if estimate > WARN_SECONDS:
        count = sum(budgets) + config.probes * len(blocks)
        warnings.warn(
            f"kfac: up to {count:,} {unit} ≈ {format_seconds(estimate)} (each layer's product "
            f"timed); {_CHEAPER} is cheaper",
            UserWarning,
            stacklevel=3,
        )


def _kron_gram(a: _Block, b: _Block) -> Tensor:
    """Inner products of two blocks' Kronecker eigenvectors: (u_i·u'_k)(v_j·v'_l)."""
    ua, va = a.U[:, a.kron_i], a.V[:, a.kron_j]
    ub, vb = b.U[:, b.kron_i], b.V[:, b.kron_j]
    return (ua.T @ ub) * (va.T @ vb)


def _layer_entry(
    b: _Block, err: tuple[float, float, int], config: KfacConfig, other: _Block | None
) -> dict[str, Any]:
    f = b.factors
    m, n = f.shape
    H = b.exact_vectors
    K = H.shape[1]
    coeff = eigenbasis_coefficients(H, b.U, b.V, (m, n))  # (K, m, n) = ⟨h_l, u_a ⊗ v_b⟩
    gram = coeff[:, b.kron_i, b.kron_j]  # (K exact, K kron)
    cu, cv = correspondence(coeff)
    rows_u, rows_v = min(m, config.corr_rows), min(n, config.corr_rows)
    # the Kronecker eigenvector r is u_{i_r} ⊗ v_{j_r}: its correspondences are indicators
    ku = torch.zeros((rows_u, K), dtype=F64)
    kv = torch.zeros((rows_v, K), dtype=F64)
    for r, (i, j) in enumerate(zip(b.kron_i.tolist(), b.kron_j.tolist(), strict=True)):
        if i < rows_u:
            ku[i, r] = 1.0
        if j < rows_v:
            kv[j, r] = 1.0
    ratio, align = input_structure(f)
    entry: dict[str, Any] = {
        "name": f.name,
        "kind": f.kind,
        "shape": [m, n],
        "positions": f.positions,
        "bias": f.bias,
        "em_eigenvalues": _floats(b.lam),
        "exx_eigenvalues": _floats(b.mu),
        "kron_eigenvalues": _floats(b.kron_values),
        "exact_eigenvalues": _floats(b.exact_values),
        "exact_residuals": _floats(b.residuals),
        "overlap": _floats(overlap_curve(gram)),
        "spectral_ratio": _finite_or_none(ratio),
        "mean_alignment": _finite_or_none(align),
        "rank1_scores": _floats(rank1_scores(H, (m, n))),
        "decoupling_error": _finite_or_none(err[0]),
        "decoupling_error_stderr": _finite_or_none(err[1]),
        "decoupling_probes": err[2],
        "em_outlier_gap": outlier_gap(b.lam[: K + 1]),  # within the top K + 1, as the block
        "exact_outlier_gap": outlier_gap(b.exact_values),
        "kron_index": [[int(i) + 1, int(j) + 1] for i, j in zip(b.kron_i, b.kron_j, strict=True)],
        "correspondence": {
            "exact_vs_em": [_floats(r) for r in cu[:rows_u].cpu()],
            "exact_vs_exx": [_floats(r) for r in cv[:rows_v].cpu()],
            "kron_vs_em": [_floats(r) for r in ku],
            "kron_vs_exx": [_floats(r) for r in kv],
        },
        "lanczos": {"converged": b.converged},
        "matvecs": b.matvecs,
        "bias_block_eigenvalues": None,
        "bias_block_vs_em": None,
        "spectral_ratio_infinite": bool(math.isinf(ratio)),
    }
    if f.bias_block is not None:
        entry["bias_block_eigenvalues"] = _floats(torch.linalg.eigvalsh(f.bias_block).flip(0))
        denom = float(torch.linalg.matrix_norm(f.bias_block))
        diff = float(torch.linalg.matrix_norm(f.bias_block - f.em))
        entry["bias_block_vs_em"] = _finite_or_none(diff / denom) if denom > 0 else None
    if other is not None:
        entry["compare"] = _compare(b, other)
    return entry


def _compare(b: _Block, other: _Block) -> dict[str, Any]:
    """Cross-model overlaps of one layer (Wu et al. 2020, §5.1, Fig. 5; Thm. E.1)."""
    f, m = b.factors, b.factors.shape[0]
    exact = overlap_curve(b.exact_vectors.T @ other.exact_vectors)
    kron = overlap_curve(_kron_gram(b, other))
    mu1 = f.mean_x / f.mean_x.norm().clamp_min(1e-300)
    mu2 = other.factors.mean_x / other.factors.mean_x.norm().clamp_min(1e-300)
    return {
        "exact_overlap": _floats(exact),
        "kron_overlap": _floats(kron),
        "predicted_overlap_at_m": _finite_or_none(float(mu1 @ mu2) ** 2),
        "m": m,
        "exact_overlap_at_m": _finite_or_none(float(exact[m - 1])) if m <= len(exact) else None,
        "kron_overlap_at_m": _finite_or_none(float(kron[m - 1])) if m <= len(kron) else None,
        "exact_overlap_peak_k": int(torch.argmax(exact)) + 1,
        "reasons": _at_m_reasons(m, len(exact)),
    }


def _at_m_reasons(m: int, k: int) -> dict[str, str]:
    """Why the overlaps at k = m are null: the top-k eigenspaces stop below m. Each reason
    starts with its short cause, before the first colon (what the table shows)."""
    if m <= k:
        return {}
    why = (
        f"m > top-k: the overlap at k = m needs the top m eigenpairs of each block, and the "
        f"layer's output size m = {m} exceeds --top-k {k}; rerun with --top-k {m} or more"
    )
    return {"exact_overlap_at_m": why, "kron_overlap_at_m": why}


def cross_overlaps(a: KfacResult, b: KfacResult) -> dict[str, dict[str, Any]]:
    """Per layer, the top-k eigenspace overlaps of two results' blocks (exact and Kronecker)
    and the prediction (Ê[x]₁ᵀÊ[x]₂)² at k = m (Wu et al. 2020, §5.1, Fig. 5).

    Both results must come from networks of one architecture measured on the same examples
    (what :func:`compute_kfac` with ``compare_model`` does, without measuring twice).
    """
    return {
        name: _compare(blk, b.blocks[name]) for name, blk in a.blocks.items() if name in b.blocks
    }


def _not_factored(model: nn.Module, factored: list[str]) -> list[str]:
    """Parameters the analysis does not factor (BatchNorm affine, embeddings, biases aside)."""
    skip = {f"{n}.weight" if n else "weight" for n in factored}
    skip |= {f"{n}.bias" if n else "bias" for n in factored}
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in skip]


def compute_kfac(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: KfacConfig | None = None,
    *,
    compare_model: nn.Module | None = None,
    progress: ProgressFn | None = None,
) -> KfacResult:
    """The Kronecker factorisation of each layer's Hessian against the exact block.

    Wu et al. 2020, §3-5: factors (Eqs. 6, 35, 37), eigenpairs (App. C), overlaps (Eq. 7),
    correspondences (§4.2), E[xxᵀ] structure (Eq. 8), low rank (§5.2), outliers (§4.4), and a
    decoupling error; with ``compare_model`` the cross-model overlap of §5.1.

    Args:
        model: the network, in eval mode.
        x: inputs (N, ...); y: int64 labels (N,) (or the targets of ``config.loss``).
        config: options (default :class:`KfacConfig()`; ``loss`` None: inferred from ``y``).
        compare_model: a second network of the same architecture, measured on the same examples.
        progress: ``progress(description, done, total)``.

    Returns:
        A :class:`KfacResult`.
    """
    config = config or KfacConfig()
    progress = progress or (lambda d, a, b: None)
    factors, blocks, errors, seconds = _analyse(model, x, y, config, progress)
    others: dict[str, _Block] = {}
    if compare_model is not None:
        _, others, _, _ = _analyse(compare_model, x, y, config, progress, tag="compare: ")
        missing = set(blocks) - set(others)
        if missing:
            raise UsageError(f"the compared model lacks layers {sorted(missing)}")
    layers = [
        LayerReport(_layer_entry(b, errors[name], config, others.get(name)))
        for name, b in blocks.items()
    ]
    return KfacResult(
        config=config,
        layers=layers,
        examples=int(x.shape[0]),
        not_factored=_not_factored(model, list(factors)),
        mode="train" if model.training else "eval",
        seconds_factors=seconds,
        compare_checkpoint=config.compare,
        blocks=blocks,
        skipped_layers=dict(getattr(factors, "skipped", {})),
    )


def load_compare_model(path: str | Path, run: Any) -> nn.Module:
    """The network of checkpoint ``path``, built like ``run``'s (same data shape, device, dtype).

    Its spec is the one stored in it, else the run's.

    Raises:
        CheckpointError: an unreadable checkpoint or weights that do not fit.
    """
    from flatcli.io.checkpoint import check_finite, load_checkpoint, match_state_dict
    from flatcli.io.spec import build_model, fill_data_kwargs, resolve_spec

    path = Path(path)
    ckpt = load_checkpoint(path)
    # its own stored spec, else the analysed run's (the two must share an architecture)
    spec = resolve_spec(path, None, ckpt.spec) if ckpt.spec else run.spec
    spec = fill_data_kwargs(spec, run.num_classes, tuple(run.x.shape[1:]))
    net = build_model(spec).to(device=run.device, dtype=run.dtype)
    state = match_state_dict(net, ckpt.state_dict, source=str(path))
    check_finite(state, source=str(path))
    net.load_state_dict(state)
    return net.eval()


# --- registration (flatcli.measures.registry) -------------------------------------------------
from flatcli.measures import registry as _registry  # noqa: E402 - registers the finished module


def _kfac_on_run(run: Any, config: KfacConfig, progress: ProgressFn) -> KfacResult:
    """:func:`compute_kfac` on a loaded checkpoint (:func:`flatcli.load`)."""
    if config.loss is None:
        config = dataclasses.replace(config, loss=_registry.loss_of(run, config))
    other = load_compare_model(config.compare, run) if config.compare else None
    return compute_kfac(run.model, run.x, run.y, config, compare_model=other, progress=progress)


def check_kfac_loss(config: KfacConfig, loss: str) -> None:
    """Refuse, before work, a loss K-FAC cannot factor: E[M] needs a closed-form output Hessian
    (``nsce`` has none), and ``--fisher mc`` samples class labels (``ce`` only)."""
    if loss == "nsce":
        raise UsageError(
            "kfac cannot take loss nsce: E[M] needs a closed-form output Hessian "
            "(losses ce, mse, bce, token-ce)"
        )
    if config.fisher == "mc" and loss != "ce":
        raise UsageError(f"kfac --fisher mc samples class labels (loss ce); loss {loss}: drop it")


def _kfac_reports(config: KfacConfig) -> list[str]:
    keys = [
        "kfac_layers",
        "decoupling_error_max",
        "overlap_at_10_min",
        "spectral_ratio_min",
        "mean_alignment_min",
        "rank1_score_min",
    ]
    return keys + (["compare_overlap_at_m_min"] if config.compare else [])


_N = _registry.Direction.NEUTRAL
_WU = "Wu et al. 2020"
_registry.register_measure(
    "kfac",
    KfacConfig,
    _kfac_on_run,
    metrics=(
        _registry.Metric("kfac_layers", _N, "-", "Linear/Conv2d layers analysed"),
        _registry.Metric(
            "decoupling_error_max",
            _N,
            f"{_WU}, Eq. 6 (error not in the paper)",
            "worst layer's ||H - E[M] (x) E[xx^T]||_F / ||H||_F (Rademacher estimate)",
        ),
        _registry.Metric(
            "overlap_at_10_min",
            _N,
            f"{_WU}, Def. 4.1, Eq. 7",
            "smallest top-10 eigenspace overlap between the Kronecker approximation and the "
            "exact layer block",
        ),
        _registry.Metric(
            "spectral_ratio_min",
            _N,
            f"{_WU}, Eq. 8, Table 6",
            "smallest ||E[x]E[x]^T|| / ||Sigma_x|| over the layers",
        ),
        _registry.Metric(
            "mean_alignment_min",
            _N,
            f"{_WU}, §4.3, Table 7",
            "smallest |<E[x]/||E[x]||, v_1(E[xx^T])>| over the layers",
        ),
        _registry.Metric(
            "rank1_score_min",
            _N,
            f"{_WU}, §5.2, Fig. 6",
            "smallest sigma_1 / ||Mat(h_1)||_F of the layers' top exact eigenvectors",
        ),
        _registry.Metric(
            "compare_overlap_at_m_min",
            _N,
            f"{_WU}, §5.1, Fig. 5",
            "with --compare: smallest top-m eigenspace overlap of two checkpoints' layer "
            "blocks (m = the layer's output size)",
        ),
    ),
    cost="one forward + c backward passes (batched) for the factors; per layer up to "
    "max(3K + 20, 60) Hessian-block products (Lanczos) + --probes products",
    reports=_kfac_reports,
    check=lambda run, config: check_kfac_loss(config, _registry.loss_of(run, config)),
    losses=("ce", "token-ce", "mse", "bce"),
    needs="a closed-form output Hessian",
)
