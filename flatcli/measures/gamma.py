r"""γ̂: the Fisher log-determinant of a local minimum (fisher-gamma-local-minima.md §5.3, Eq. 5),
with the baselines of §7.1 computed from the same Gram matrices.

For t = 1..T a sample :math:`\mathcal S^t` of N' examples is drawn without replacement, J_t is the
N' × W matrix of per-example gradients of :math:`\ell(f_w(x), \tilde y)` (ỹ the example's label),
and :math:`\xi_t = J_t J_t^\top` (a principal N' × N' sub-matrix of W·I'(w₀), Eq. 4). Then

.. math::
    \hat\gamma = \frac1T\sum_t \ln|\xi_t|, \qquad
    \gamma \approx \frac{W}{N'}\hat\gamma - W\ln W \quad\text{(Eq. 5; ``gamma_scaled``)}.

Lower is better (a flatter, better generalising minimum). Baselines (§7.1, Appendix D) from the
same ξ_t: ``fisher_trace`` = mean_t tr(ξ_t)/N' (the §6 surrogate tr I), ``spectral_radius`` =
mean_t λ_max(ξ_t) = mean_t ‖J_t‖₂² (Appendix D, scaling constants dropped),
``fisher_frobenius_sq`` = mean_t ‖ξ_t‖_F²/N'² (the Frobenius norm of the sample Fisher
(1/N') J_tᵀJ_t, whose squared norm equals ‖ξ_t‖_F²/N'², computed exactly rather than by the
paper's 100,000 sampled entries), and with ``baselines=True`` ``robustness`` =
(1/N) Σ_x ‖∂softmax(f_w(x))/∂x‖₂² over all N examples (Sokolić et al.), by power iteration
on products with the input Jacobian (:func:`input_jacobian_sq_norms`).

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

Authors' variants (shared/NOTES.md): their code reports Σ log singular values of J, i.e.
½ ln|ξ|, and normalises the logits to a fixed norm 1/0.04 before the softmax
(``logit_scale=25``). Both keep the ranking of minima; ``gamma_hat`` is the paper's Eq. 5.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp
from torch.nn.modules.batchnorm import _BatchNorm

from flatcli.curvature.gram import GramEngine, GramMethod, GramSpectrum, gram_spectrum
from flatcli.curvature.losses import cross_entropy
from flatcli.curvature.operators import eval_mode
from flatcli.errors import UsageError
from flatcli.measures._config import choice as _choice
from flatcli.measures._config import finite_or_none as _finite_or_none
from flatcli.measures._config import floats as _floats
from flatcli.measures._config import require as _require
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


class BNMode(str, Enum):
    """How BatchNorm layers normalise while γ̂ is measured."""

    EVAL = "eval"
    TRAIN = "train"


@dataclass(frozen=True)
class GammaConfig:
    """What :func:`compute_gamma` computes.

    Attributes:
        samples: N', examples per sample S^t (the paper: 100).
        trials: T, samples drawn (the paper: 100).
        logit_scale: if set, logits are rescaled to this Euclidean norm before the softmax (the
            authors' code: 1/0.04 = 25); applied to γ̂, the baselines and robustness alike.
        baselines: also compute ``robustness`` (the Gram-based baselines are always reported).
        bn_mode: ``"eval"`` (running statistics) or ``"train"`` (statistics of each sample, as
            the authors' code; materialised engine only).
        seed: seeds the samples and the robustness power iteration.
        batch_size: examples per forward (None: up to 1024); results do not depend on it
            beyond round-off.
        method: Gram engine, ``"auto"``, ``"ghost"`` or ``"materialize"``.
        head_dtype: dtype of the loss head, ``"float64"`` (default) or ``"float32"``.
        robustness_tol: power iteration stops for an example when the residual
            ‖JJᵀu − θu‖ ≤ tol·θ: then θ is within tol·θ of an eigenvalue of JJᵀ, and (a
            Rayleigh quotient) within about tol²·θ²/gap of it.
        robustness_max_iter: power iterations at most.
    """

    samples: int = 100
    trials: int = 100
    logit_scale: float | None = None
    baselines: bool = False
    bn_mode: str = "eval"
    seed: int = 0
    batch_size: int | None = None
    method: str = "auto"
    head_dtype: str = "float64"
    robustness_tol: float = 1e-4
    robustness_max_iter: int = 200

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "bn_mode", _choice(BNMode, self.bn_mode, "bn_mode"))
        set_(self, "method", _choice(GramMethod, self.method, "method"))
        head = str(self.head_dtype).removeprefix("torch.")
        if head not in ("float32", "float64"):
            raise UsageError(f"Unknown head dtype {self.head_dtype!r}; choose float32 or float64.")
        set_(self, "head_dtype", head)
        checks = [
            (self.samples >= 1, f"samples must be >= 1. Got {self.samples}."),
            (self.trials >= 1, f"trials must be >= 1. Got {self.trials}."),
            (
                self.logit_scale is None
                or (math.isfinite(self.logit_scale) and self.logit_scale > 0),
                f"logit_scale must be a positive number. Got {self.logit_scale}.",
            ),
            (
                self.batch_size is None or self.batch_size >= 1,
                f"batch_size must be >= 1. Got {self.batch_size}.",
            ),
            (
                0 < self.robustness_tol < 1,
                f"robustness_tol must be in (0, 1). Got {self.robustness_tol}.",
            ),
            (
                self.robustness_max_iter >= 1,
                f"robustness_max_iter must be >= 1. Got {self.robustness_max_iter}.",
            ),
        ]
        _require(checks)

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready."""
        return asdict(self)


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
        x: (N, ...) inputs of the split; y: (N,) int64 labels ỹ.
        config: :class:`GammaConfig` (default: the paper's N' = T = 100).
        progress: called as ``progress(description, done, total)``.

    Raises:
        UsageError: N' larger than the split, or a bad configuration.
    """
    config = config or GammaConfig()
    N, n, T = int(x.shape[0]), config.samples, config.trials
    if n > N:
        raise UsageError(f"samples N' = {n} exceeds the {N} examples of the split.")
    head_dtype = torch.float64 if config.head_dtype == "float64" else torch.float32

    def loss_fn(z: Tensor, labels: Tensor) -> Tensor:
        return cross_entropy(scaled_logits(z, config.logit_scale), labels)

    index = draw_samples(N, n, T, config.seed)  # (T, N')
    with _measuring_mode(model, config.bn_mode == "train"):
        engine = GramEngine(model, loss_fn, head_dtype, config.method, config.batch_size)
        flat = index.reshape(-1)
        xi = engine.grams(
            x[flat], y[flat], n, progress=lambda _, done, total: progress("gamma", done, total)
        )
    net_eps = torch.finfo(engine.functional.dtype).eps
    spectrum = gram_spectrum(xi, row_eps=net_eps)
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
        engine={
            "method": engine.method.value,
            "fallback_reason": engine.fallback_reason,
            "layers": engine.layer_strategies(),
            "head_dtype": config.head_dtype,
            "network_dtype": str(engine.functional.dtype).removeprefix("torch."),
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

    Sokolić et al.'s robustness measure (fisher-gamma-local-minima.md §7.1). For each example the
    power iteration runs on the K × K matrix J Jᵀ (J = ∂softmax/∂x, K classes): u ← JJᵀu / ‖·‖,
    with Jᵀu a vjp (reused across iterations) and J(Jᵀu) a jvp, batched over the examples of a
    chunk; the dense Jacobian is never formed. An example stops when ‖JJᵀu − θu‖ ≤ tol·θ
    (θ = uᵀJJᵀu); the chunk stops when all have, or after ``max_iter`` iterations. The softmax
    runs in float64.

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

    def f(inp: Tensor) -> Tensor:
        return torch.softmax(scaled_logits(model(inp).to(F64), logit_scale), dim=-1)

    for b0 in range(0, N, c):
        xb = x[b0 : b0 + c].to(device=device, dtype=dtype)
        probs, pullback = vjp(f, xb)
        u = torch.randn(probs.shape, generator=gen, dtype=F64).to(device)
        u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
        theta = torch.zeros(len(xb), dtype=F64, device=device)
        rel = torch.full_like(theta, math.inf)
        it = 0
        while it < max_iter:
            it += 1
            (v,) = pullback(u)  # Jᵀu, shaped like xb
            _, w = jvp(f, (xb,), (v,))  # J Jᵀ u, (c, K) float64
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
