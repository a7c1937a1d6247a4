r"""γ̂: the Fisher log-determinant of a local minimum (Jia & Su 2020, §5.3, Eq. 5), with the
baselines of their §7.1 computed from the same Gram matrices.

For t = 1..T a sample :math:`\mathcal S^t` of N' examples is drawn without replacement, J_t is the
N' × W matrix of per-example gradients g_n of :math:`\ell(f_w(x), \tilde y)` (ỹ the example's
label), and :math:`\xi_t = J_t J_t^\top` (a principal N' × N' sub-matrix of W·I'(w₀), Eq. 4). Then

.. math::
    \hat\gamma = \frac1T\sum_t \ln|\xi_t|, \qquad
    \gamma \approx \frac{W}{N'}\hat\gamma - W\ln W \quad\text{(Eq. 5; ``gamma_scaled``)}.

Lower is better (a flatter, better generalising minimum). Baselines (§7.1, Appendix D) from the
same ξ_t:

- ``fisher_trace`` = mean_t tr(ξ_t)/N' (the §6 surrogate tr I);
- ``spectral_radius`` = mean_t λ_max(ξ_t) = mean_t ‖J_t‖₂² (Appendix D, scaling constants
  dropped);
- ``fisher_frobenius_sq`` = mean_t ‖ξ_t‖_F²/N'² = mean_t ‖(1/N') J_tᵀJ_t‖_F², the exact squared
  Frobenius norm of the sampled Fisher (1/N') Σ_n g_n g_nᵀ: every term (g_n·g_m)² of the double
  sum over n, m. This is NOT the number Appendix D computes;
- ``fisher_frobenius_sq_diag`` = mean_t (1/N') Σ_{n∈S^t} ‖g_n g_nᵀ‖_F² = mean_t (1/N') Σ_n ‖g_n‖⁴,
  Appendix D's estimate (after Wu et al. 2017): it writes ‖I‖_F² as (1/N) Σ_x ‖g_x g_xᵀ‖_F², which
  keeps only the diagonal terms n = m of the double sum (and divides by N, not N²). It is
  computed exactly from the diagonal of ξ_t rather than from the paper's 100,000 sampled
  entries of g gᵀ; use it to reproduce the paper's table;
- with ``baselines=True``, ``robustness`` = (1/N) Σ_x ‖∂softmax(f_w(x))/∂x‖₂² over all N examples
  (Sokolić et al. 2017), by power iteration on products with the input Jacobian, with the
  softmax Jacobian's exact entries (:func:`input_jacobian_sq_norms`).

Log-determinants are exact in float64 (Cholesky of the diagonally scaled ξ_t, see
:func:`flatcli.curvature.gram.gram_spectrum`). When N' > W, or a sample is (numerically)
singular — e.g. a duplicated example, or an example whose gradient is exactly 0 — ln|ξ_t| = −∞:
``gamma_hat`` is then None, never a clipped number, and ``details`` give the reason and the
rank of every trial.

BatchNorm (``bn_mode``): ``"eval"`` (default) uses the running statistics, so each example's
gradient depends on that example only and the ghost engine applies. ``"train"`` reproduces the
authors' code (BatchNorm in training mode, statistics of the N' sample): example n's loss then
depends on every example of the sample through the batch mean and variance, row n of J_t is
∂ℓ_n/∂w *through those statistics*, the rows are not per-example gradients in the usual sense,
and ξ_t is not a sub-matrix of one fixed matrix (it depends on which examples share the sample).
Only the materialised engine computes that exactly (one backward per example, each through the
whole sample: N' times the cost of a batch backward). Running statistics are never updated.

Authors' variants (their released code): it reports Σ log singular values of J, i.e.
½ ln|ξ|, and normalises the logits to a fixed norm 1/0.04 before the softmax
(``logit_scale=25``). Both keep the ranking of minima; ``gamma_hat`` is the paper's Eq. 5.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp
from torch.nn.modules.batchnorm import _BatchNorm

from flatcli import distributed
from flatcli.configs.choices import ALL_LOSSES, CLASS_LOSSES
from flatcli.configs.gamma import BNMode, GammaConfig
from flatcli.curvature.data import iter_chunks
from flatcli.curvature.gram import GramEngine, GramSpectrum, gram_spectrum
from flatcli.curvature.losses import get_loss, infer_loss, output_hessian
from flatcli.curvature.operators import eval_mode
from flatcli.dtypes import DTYPES, dtype_name
from flatcli.errors import UsageError
from flatcli.measures._config import finite_or_none as _finite_or_none
from flatcli.measures._config import floats as _floats
from flatcli.progress import ProgressFn, no_progress

__all__ = [
    "BNMode",
    "GammaConfig",
    "GammaResult",
    "compute_gamma",
    "draw_samples",
    "input_jacobian_sq_norms",
    "scaled_logits",
]

F64 = torch.float64


@dataclass(frozen=True)
class GammaResult:
    """What :func:`compute_gamma` measured.

    ``spectrum`` holds the per-trial tensors (logdet, trace, λ_max, λ_min, condition, rank).
    """

    config: GammaConfig
    num_params: int
    num_examples: int
    spectrum: GramSpectrum
    robustness: float | None
    robustness_info: dict[str, Any] | None
    engine: dict[str, Any]
    diag_sq: Tensor | None = None
    """(T,) float64: Σ_n ξ_t[n, n]² = Σ_n ‖g_n‖⁴ per trial (``fisher_frobenius_sq_diag``)."""

    @property
    def singular_trials(self) -> int:
        return int(self.spectrum.singular.sum())

    @property
    def gamma_hat(self) -> float | None:
        """Eq. 5's γ̂, or None when a trial's ln|ξ_t| is −∞ (see ``details()['reason']``)."""
        if self.singular_trials:
            return None
        return float(self.spectrum.logdet.mean())

    @property
    def gamma_hat_std(self) -> float | None:
        """Standard deviation of ln|ξ_t| over trials (ddof=1); None for one trial or singular."""
        if self.singular_trials or self.config.trials < 2:
            return None
        return float(self.spectrum.logdet.std(correction=1))

    @property
    def gamma_scaled(self) -> float | None:
        """(W/N')·γ̂ − W ln W, the right-hand side of Eq. 5 (an estimate of γ = ln|I|)."""
        g = self.gamma_hat
        if g is None:
            return None
        W, n = self.num_params, self.config.samples
        return W / n * g - W * math.log(W)

    def metrics(self) -> dict[str, float | int | None]:
        """Flat numbers: γ̂ and its baselines, the sample sizes and W."""
        n = self.config.samples
        s = self.spectrum
        out: dict[str, float | int | None] = {
            "gamma_hat": self.gamma_hat,
            "gamma_hat_std": self.gamma_hat_std,
            "gamma_scaled": self.gamma_scaled,
            "fisher_trace": float(s.trace.mean()) / n,
            "spectral_radius": float(s.lam_max.mean()),
            "fisher_frobenius_sq": float(s.frobenius_sq.mean()) / n**2,
            "fisher_frobenius_sq_diag": (
                None if self.diag_sq is None else float(self.diag_sq.mean()) / n
            ),
        }
        if self.config.baselines:
            out["robustness"] = self.robustness
        out.update(samples=n, trials=self.config.trials, num_params=self.num_params)
        return {k: _finite_or_none(v) for k, v in out.items()}

    def details(self) -> dict[str, Any]:
        """Per-trial values, singularity, the engine used and how robustness converged."""
        s = self.spectrum
        out: dict[str, Any] = {
            "per_trial": {
                "logdet": _floats(s.logdet),
                "trace": _floats(s.trace),
                "lambda_max": _floats(s.lam_max),
                "lambda_min": _floats(s.lam_min),
                "condition": _floats(s.cond),
                "rank": [int(r) for r in s.rank.tolist()],
            },
            "singular_trials": self.singular_trials,
            "rank_rule": (
                "singular when the float64 Cholesky of the diagonally scaled ξ fails or its "
                "smallest eigenvalue is <= N'(eps64·μ_max + (10·eps_net)²); rank counts the "
                "eigenvalues above that threshold"
            ),
            "num_examples": self.num_examples,
            "bn_mode": self.config.bn_mode,
            "logit_scale": self.config.logit_scale,
            "engine": self.engine,
        }
        reason = self._reason()
        if reason:
            out["reason"] = reason
            out["nonfinite"] = {k: reason for k in ("gamma_hat", "gamma_hat_std", "gamma_scaled")}
        elif self.config.trials < 2:
            out["nonfinite"] = {"gamma_hat_std": "one trial: no standard deviation"}
        if self.robustness_info is not None:
            out["robustness"] = self.robustness_info
        return out

    def _reason(self) -> str | None:
        k = self.singular_trials
        if not k:
            return None
        n, W = self.config.samples, self.num_params
        ranks = sorted(
            {int(r) for r, sg in zip(self.spectrum.rank, self.spectrum.singular, strict=True) if sg}
        )
        if n > W:
            why = f"N' = {n} samples exceed W = {W} parameters, so ξ has rank <= W < N'"
        else:
            why = (
                "ξ is singular (duplicated examples, an example with zero gradient, or "
                "linearly dependent gradients)"
            )
        return (
            f"{k} of {self.config.trials} trials have ln|ξ| = -inf: {why}; rank found "
            f"{ranks} of {n}"
        )


def scaled_logits(z: Tensor, scale: float | None) -> Tensor:
    """Logits rescaled to Euclidean norm ``scale`` per example (None: unchanged)."""
    if scale is None:
        return z
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    return z * (scale / norm.clamp_min(torch.finfo(z.dtype).tiny))


@contextmanager
def _measuring_mode(model: nn.Module, bn_train: bool) -> Iterator[None]:
    """Eval mode (BatchNorm in train mode if asked) for the block; every flag restored after."""
    with eval_mode(model):
        if bn_train:
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    m.train()
        yield


def check_gamma_loss(config: GammaConfig, loss: str | None = None) -> None:
    """Refuse what needs classes with another loss (before work): ``--baselines``
    (``robustness`` differentiates the softmax) and ``--logit-scale`` (rescales logits).

    γ̂ itself takes any loss: its J has one row per example, the gradient of that example's
    loss (:func:`flatcli.curvature.losses.get_loss`).
    """
    loss = loss or config.loss
    if loss is None or loss in CLASS_LOSSES:
        return
    if config.baselines:
        raise UsageError(
            f"gamma --baselines cannot take loss {loss}: robustness needs class logits "
            "(loss ce or nsce); drop --baselines"
        )
    if config.logit_scale is not None:
        raise UsageError(
            f"gamma --logit-scale cannot take loss {loss}: it rescales class logits "
            "(loss ce or nsce); drop --logit-scale"
        )


def compute_gamma(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: GammaConfig | None = None,
    *,
    progress: ProgressFn = no_progress,
) -> GammaResult:
    """γ̂ of Eq. 5 and its baselines for ``model`` on the split ``(x, y)``.

    Args:
        model: the network (its modes and weights are left as they were).
        x: (N, ...) inputs of the split; y: (N,) int64 labels ỹ (or the targets of
            ``config.loss``: token targets (N, T), float targets).
        config: :class:`GammaConfig` (default: the paper's N' = T = 100).
        progress: called as ``progress(description, done, total)``.

    Raises:
        UsageError: N' larger than the split, or a bad configuration.
    """
    config = config or GammaConfig()
    if config.loss is None:
        config = dataclasses.replace(config, loss=infer_loss(y))
    check_gamma_loss(config)
    N, n, T = int(x.shape[0]), config.samples, config.trials
    if n > N:
        raise UsageError(f"samples N' = {n} exceeds the {N} examples of the split.")
    head_dtype = DTYPES[config.head_dtype]
    head = get_loss(config.loss)

    def loss_fn(z: Tensor, labels: Tensor) -> Tensor:
        if config.loss in CLASS_LOSSES:
            z = scaled_logits(z, config.logit_scale)
        return head(z, labels)

    index = draw_samples(N, n, T, config.seed)  # (T, N')
    with _measuring_mode(model, config.bn_mode == "train"):
        engine = GramEngine(model, loss_fn, head_dtype, config.method, config.batch_size)
        # under torchrun each process computes a contiguous share of the T trials and the
        # Gram matrices are gathered (flatcli.distributed; one process: all of them here)
        a, b = distributed.shard_bounds(T)

        def share() -> Tensor:
            if a == b:  # more processes than trials
                return torch.zeros((0, n, n), dtype=torch.float64)
            flat = index[a:b].reshape(-1)
            return engine.grams(
                x[flat], y[flat], n, progress=lambda _, done, total: progress("gamma", done, total)
            )

        if distributed.active():
            parts = distributed.gather_work(lambda: share().cpu(), "computing gamma's trials")
            xi = torch.cat([p for p in parts if p.shape[0]])
        else:
            xi = share()
    net_eps = torch.finfo(engine.functional.dtype).eps
    spectrum = gram_spectrum(xi, row_eps=net_eps)
    diag_sq = xi.diagonal(dim1=1, dim2=2).pow(2).sum(dim=1).cpu()  # Σ_n ‖g_n‖⁴ per trial
    del xi
    robustness = info = None
    if config.baselines:
        with _measuring_mode(model, False):
            values, info = input_jacobian_sq_norms(
                model,
                x,
                logit_scale=config.logit_scale,
                tol=config.robustness_tol,
                max_iter=config.robustness_max_iter,
                batch_size=config.batch_size,
                seed=config.seed,
                progress=progress,
            )
        robustness = float(values.mean())
    return GammaResult(
        config=config,
        num_params=engine.num_params,
        num_examples=N,
        spectrum=spectrum,
        robustness=robustness,
        robustness_info=info,
        diag_sq=diag_sq,
        engine={
            "method": engine.method.value,
            "fallback_reason": engine.fallback_reason,
            "layers": engine.layer_strategies(),
            "head_dtype": config.head_dtype,
            "network_dtype": dtype_name(engine.functional.dtype),
        },
    )


def draw_samples(num_examples: int, samples: int, trials: int, seed: int) -> Tensor:
    """The samples S^1..S^T: (T, N') int64 indices, each row drawn without replacement.

    Row t is the first N' entries of the t-th ``torch.randperm(num_examples)`` of a CPU
    ``torch.Generator`` seeded with ``seed`` (the same on every device).
    """
    gen = torch.Generator().manual_seed(int(seed))
    rows = [torch.randperm(num_examples, generator=gen)[:samples] for _ in range(trials)]
    return torch.stack(rows)


def input_jacobian_sq_norms(
    model: nn.Module,
    x: Tensor,
    *,
    logit_scale: float | None = None,
    tol: float = 1e-4,
    max_iter: int = 200,
    batch_size: int | None = None,
    seed: int = 0,
    progress: ProgressFn = no_progress,
) -> tuple[Tensor, dict[str, Any]]:
    """‖∂softmax(f_w(x))/∂x‖₂² per example, (N,) float64, by batched power iteration.

    The robustness measure of Sokolić et al. 2017 used as a baseline by Jia & Su 2020, §7.1.
    J = ∂softmax(z)/∂x = Λ J_z with J_z = ∂z/∂x (z the logits, rescaled when ``logit_scale``
    is set) and Λ = diag(p) − p pᵀ from :func:`flatcli.curvature.losses.output_hessian`, whose
    entries are exact (diagonal p_c Σ_{j≠c} p_j). Autograd through ``torch.softmax`` would form
    Λ's label entry as p_y − p_y² and lose it once 1 − p_y < 1e-16, which confident examples of a
    trained net are. For each example the power iteration runs on the K × K matrix J Jᵀ
    (K classes): u ← JJᵀu / ‖·‖, with Jᵀu = J_zᵀ(Λu) a vjp of the logits (reused across
    iterations) and J(Jᵀu) = Λ(J_z Jᵀu) a jvp, batched over the examples of a chunk; no dense
    Jacobian is formed. An example stops when ‖JJᵀu − θu‖ ≤ tol·θ (θ = uᵀJJᵀu); the chunk
    stops when all have, or after ``max_iter`` iterations. The head runs in float64.

    Returns:
        The values and ``{"tol", "max_iter", "iterations" (max over chunks), "unconverged",
        "max_relative_residual"}``.
    """
    with torch.no_grad(), warnings.catch_warnings():
        # torch.func transforms still differentiate under no_grad; no graph to the weights.
        # torch's first forward-mode AD use warns about its own internal torch.jit.script.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        return _power_iteration(model, x, logit_scale, tol, max_iter, batch_size, seed, progress)


def _power_iteration(
    model: nn.Module,
    x: Tensor,
    logit_scale: float | None,
    tol: float,
    max_iter: int,
    batch_size: int | None,
    seed: int,
    progress: ProgressFn,
) -> tuple[Tensor, dict[str, Any]]:
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    N = int(x.shape[0])
    c = int(batch_size or 256)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(N, dtype=F64)
    iters, unconverged, worst = 0, 0, 0.0

    def f(inp: Tensor) -> Tensor:  # the (rescaled) logits in float64
        return scaled_logits(model(inp).to(F64), logit_scale)

    for b0, _, xb, _ in iter_chunks(x, None, c, device, dtype):
        z, pullback = vjp(f, xb)
        lam = output_hessian(z)  # (c, K, K): ∂softmax/∂z = Λ, symmetric, exact entries
        u = torch.randn(z.shape, generator=gen, dtype=F64).to(device)
        u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
        theta = torch.zeros(len(xb), dtype=F64, device=device)
        rel = torch.full_like(theta, math.inf)
        it = 0
        while it < max_iter:
            it += 1
            (v,) = pullback(torch.einsum("nck,nk->nc", lam, u))  # Jᵀu = J_zᵀ Λ u, like xb
            _, jv = jvp(f, (xb,), (v,))
            w = torch.einsum("nck,nk->nc", lam, jv)  # J Jᵀ u = Λ J_z Jᵀu, (c, K) float64
            theta = (u * w).sum(dim=1)
            res = torch.linalg.vector_norm(w - theta.unsqueeze(1) * u, dim=1)
            rel = torch.where(
                theta > 0, res / theta.clamp_min(torch.finfo(F64).tiny), torch.zeros_like(res)
            )
            norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
            if bool((rel <= tol).all()):
                break
            u = torch.where(norm > 0, w / norm.clamp_min(torch.finfo(F64).tiny), u)
        iters = max(iters, it)
        unconverged += int((rel > tol).sum())
        worst = max(worst, float(rel.max()))
        out[b0 : b0 + len(xb)] = theta.clamp_min(0).cpu()
        progress("robustness", min(N, b0 + c), N)
    return out, {
        "tol": tol,
        "max_iter": max_iter,
        "iterations": iters,
        "unconverged": unconverged,
        "max_relative_residual": worst,
        "examples": N,
    }


# --- registration (flatcli.measures.registry) -------------------------------------------------
from flatcli.measures import registry as _registry  # noqa: E402 - registers the finished module

_JS = "Jia & Su 2020"


def _gamma_reports(config: GammaConfig) -> list[str]:
    keys = [m.key for m in _GAMMA_METRICS]
    return keys if config.baselines else [k for k in keys if k != "robustness"]


_S, _N = _registry.Direction.SHARPER, _registry.Direction.NEUTRAL
_GAMMA_METRICS = (
    _registry.Metric("gamma_hat", _S, f"{_JS}, Eq. 5", "mean over T samples of ln|J Jᵀ|"),
    _registry.Metric(
        "gamma_hat_std", _N, f"{_JS}, Eq. 5", "standard deviation of ln|J Jᵀ| over the T samples"
    ),
    _registry.Metric(
        "gamma_scaled", _S, f"{_JS}, Eq. 5", "γ ≈ (W/N')·γ̂ − W ln W, the full log-determinant"
    ),
    _registry.Metric(
        "fisher_trace", _S, f"{_JS}, §6 (tr I surrogate)", "mean over samples of tr(J Jᵀ)/N'"
    ),
    _registry.Metric(
        "spectral_radius",
        _S,
        f"{_JS}, §7.1 and App. D (after Keskar et al. 2017)",
        "mean over samples of λ_max(J Jᵀ) = ‖J‖₂²",
    ),
    _registry.Metric(
        "fisher_frobenius_sq",
        _S,
        f"{_JS}, §7.1 (App. D's measure, after Wu et al. 2017, in its exact form)",
        "mean over samples of ‖J Jᵀ‖_F²/N'², the sampled Fisher's exact squared Frobenius norm",
    ),
    _registry.Metric(
        "fisher_frobenius_sq_diag",
        _S,
        f"{_JS}, App. D (after Wu et al. 2017)",
        "mean over samples of (1/N') Σ_n ‖g_n‖⁴, the diagonal terms of ‖J Jᵀ‖_F² (the paper's)",
    ),
    _registry.Metric(
        "robustness",
        _S,
        f"{_JS}, §7.1 (after Sokolić et al. 2017)",
        "mean over all examples of ‖∂softmax/∂x‖₂² (with --baselines)",
    ),
    _registry.Metric("samples", _N, f"{_JS}, Eq. 5", "N', examples per sample"),
    _registry.Metric("trials", _N, f"{_JS}, Eq. 5", "T, samples drawn"),
    _registry.NUM_PARAMS,
)
_registry.register_measure(
    "gamma",
    GammaConfig,
    _registry.on_run(compute_gamma),
    metrics=_GAMMA_METRICS,
    cost="T·N' per-example gradients (ghost: T·⌈N'/B⌉ forward+backward passes) and T "
    "N'×N' Cholesky factorisations; --baselines: power iteration on every example",
    reports=_gamma_reports,
    check=lambda run, config: check_gamma_loss(config, _registry.loss_of(run, config)),
    losses=ALL_LOSSES,
)
