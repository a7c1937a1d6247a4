"""``GammaConfig``: the options of γ̂ (:func:`flatcli.measures.gamma.compute_gamma`) and their
choices."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from flatcli.configs._checks import head_dtype_name, require
from flatcli.configs.choices import LossName
from flatcli.errors import choice
from flatcli.options import choices, option

__all__ = ["BNMode", "GramMethod", "GammaConfig"]


GramMethod = choices(
    "GramMethod", "auto materialize ghost", "How per-example gradients enter the Gram matrix."
)


BNMode = choices("BNMode", "eval train", "How BatchNorm layers normalise while γ̂ is measured.")


@dataclass(frozen=True)
class GammaConfig:
    """What :func:`flatcli.measures.gamma.compute_gamma` computes.

    Attributes:
        samples: N', examples per sample S^t (the paper: 100).
        trials: T, samples drawn (the paper: 100).
        logit_scale: if set, logits are rescaled to this Euclidean norm before the softmax (the
            authors' code: 1/0.04 = 25); applied to γ̂, the baselines and robustness alike.
        baselines: also compute ``robustness`` (the Gram-based baselines are always reported).
            ``robustness`` differentiates the softmax: loss ce or nsce only.
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
        loss: the loss whose per-example gradients form J (docs: "Your model": ``token-ce`` a
            sequence's mean over its counted positions, ``mse``/``bce`` the mean over its
            outputs); None: the run's (the common ``--loss``), else inferred from the targets.
    """

    samples: int = option(100, "--samples", "N': examples per sample S^t (the paper: 100).", min=1)
    trials: int = option(100, "--trials", "T: samples drawn (the paper: 100).", min=1)
    logit_scale: float | None = option(
        None,
        "--logit-scale",
        "Rescale the logits to this norm before the softmax (the authors' code: 25 = 1/0.04).",
    )
    baselines: bool = option(
        False,
        "--baselines",
        "Also the robustness baseline (mean squared spectral norm of d softmax / d input, "
        "by power iteration over every example). The Gram-based baselines are always reported.",
    )
    bn_mode: str = option(
        "eval",
        "--bn-mode",
        "BatchNorm statistics: eval (running) or train (of each sample, as the authors' "
        "code; exact but N' backward passes per sample).",
        choices=BNMode,
    )
    seed: int = 0
    batch_size: int | None = None
    method: str = option(
        "auto",
        "--method",
        "Gram engine: ghost (one forward+backward per chunk, never forms J), materialize "
        "(vmap per-example gradients) or auto (ghost where it applies).",
        choices=GramMethod,
    )
    head_dtype: str = option(
        "float64", "--head-dtype", "dtype of the loss head (float64 keeps confident examples)."
    )
    robustness_tol: float = 1e-4
    robustness_max_iter: int = 200
    loss: str | None = None  # not a flag: the common --loss (None: the run's, else inferred)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.loss is not None:
            set_(self, "loss", choice(LossName, self.loss, "loss"))
        set_(self, "bn_mode", choice(BNMode, self.bn_mode, "bn_mode"))
        set_(self, "method", choice(GramMethod, self.method, "method"))
        set_(self, "head_dtype", head_dtype_name(self.head_dtype))
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
        require(checks)

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready."""
        return asdict(self)
