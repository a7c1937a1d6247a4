"""``SpectrumConfig``: the options of ``flatcli spectrum`` and their choices: the curvature
matrix, the end of the spectrum, how products are formed, the trace estimator."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from flatcli.configs._checks import head_dtype_name, require
from flatcli.configs.choices import LossName
from flatcli.errors import choice
from flatcli.options import choices, option

__all__ = ["Kind", "HvpMethod", "Which", "DEFAULT_TOL", "TraceMethod", "SpectrumConfig"]

DEFAULT_TOL = 1e-5
"""Residual tolerance relative to |λ_max|. The eigenvalue error is at most the residual, and
about residual² / gap for a separated eigenvalue: 1e-5 gives eigenvalues good to ~1e-8 relative
yet stays above the noise floor of float32 curvature products (~1e-6 relative)."""


Kind = choices("Kind", "hessian ggn fisher", "Which curvature matrix.")


HvpMethod = choices(
    "HvpMethod",
    "auto forward-over-reverse double-backward",
    "How curvature-vector products are differentiated.",
)


Which = choices(
    "Which",
    "largest smallest magnitude",
    "Which end of the spectrum :func:`flatcli.curvature.lanczos.lanczos` looks for.",
)


TraceMethod = choices("TraceMethod", "hutchinson hutchpp", "Trace estimators.")


@dataclass(frozen=True)
class SpectrumConfig:
    """What :func:`flatcli.measures.spectrum.compute_spectrum` computes.

    Attributes:
        matrix: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        top_k: eigenvalues to find (0: none).
        which: ``"largest"``, ``"smallest"`` or ``"magnitude"`` (a trained network's Hessian
            has negative eigenvalues, so largest and largest-magnitude differ).
        tol: Lanczos residual tolerance relative to ``|λ_max|``.
        lanczos_steps: budget of Lanczos steps for the eigenvalues (default
            ``min(dim, max(20 top_k, 100))``) and the steps of each density run (default 90).
        trace: estimate the trace.
        trace_method: ``"hutchpp"`` (default: the outliers of a trained network make it the
            cheaper one for a given standard error) or ``"hutchinson"``.
        probes: products the trace may spend.
        trace_rel_stderr: stop the trace probes once the standard error falls below this
            fraction of the estimate (None: spend all ``probes``).
        density: estimate the spectral density.
        density_runs: random start vectors of the density.
        layers: module names or globs restricting the parameters (None: all).
        per_layer: also measure one block per parameterised module.
        seed: seeds the Lanczos start vector, the probes, the density and an MC Fisher's labels.
        batch_size: examples per chunk of a product (None: chosen to fit memory).
        head_dtype: dtype of the loss head: ``"float64"`` (default) keeps the curvature of
            confident examples, whose ``1 − p(y|x)`` rounds away in float32; None
            evaluates it in the model's dtype.
        loss: the loss (``ce``, ``nsce``, ``token-ce``, ``mse``, ``bce``); None: the run's loss
            (the common ``--loss``), or inferred from the targets in the library call.
        hvp_method: ``"auto"``, ``"forward-over-reverse"`` or ``"double-backward"``.
        eigenvectors: keep the Ritz vectors in the result (``SpectrumResult.eigenvectors``).
    """

    matrix: str = option("hessian", "--matrix", "Curvature matrix of the mean loss.", choices=Kind)
    top_k: int = option(10, "--top-k", "Eigenvalues to compute (0: none).", min=0)
    which: str = option("largest", "--which", "End of the spectrum to look at.", choices=Which)
    tol: float = option(DEFAULT_TOL, "--tol", "Lanczos residual tolerance, relative to |λ_max|.")
    lanczos_steps: int | None = option(
        None,
        "--lanczos-steps",
        "Most Lanczos steps for the eigenvalues; steps per density run (default 90).",
        min=1,
    )
    trace: bool = option(False, "--trace", "Estimate the trace, with a standard error.")
    trace_method: str = option(
        "hutchpp",
        "--trace-method",
        "hutchpp (fewer products when a few eigenvalues dominate).",
        choices=TraceMethod,
    )
    probes: int = option(100, "--probes", "Products the trace may spend.", min=2)
    trace_rel_stderr: float | None = option(
        None,
        "--trace-rel-stderr",
        "Stop the trace once its standard error is below this fraction of it.",
    )
    density: bool = option(
        False, "--density", "Spectral density by stochastic Lanczos quadrature (JSON)."
    )
    density_runs: int = option(1, "--density-runs", "Random start vectors.", min=1)
    layers: tuple[str, ...] | None = option(
        None,
        "--layer",
        "Module name or glob: restrict to its parameters. Repeatable.",
        repeatable=True,
    )
    per_layer: bool = option(
        False, "--per-layer", "Also a row per parameterised module (its diagonal block)."
    )
    seed: int = 0
    batch_size: int | None = None
    head_dtype: str | None = option(
        "float64", "--head-dtype", "dtype of the loss head (float64 keeps confident examples)."
    )
    loss: str | None = None  # not a flag: the common --loss (None: the run's loss)
    hvp_method: str = option("auto", "--hvp-method", "How products are formed.", choices=HvpMethod)
    eigenvectors: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "matrix", choice(Kind, self.matrix, "matrix"))
        set_(self, "which", choice(Which, self.which, "which"))
        set_(self, "trace_method", choice(TraceMethod, self.trace_method, "trace method"))
        set_(self, "hvp_method", choice(HvpMethod, self.hvp_method, "hvp method"))
        if self.loss is not None:
            set_(self, "loss", choice(LossName, self.loss, "loss"))
        if isinstance(self.layers, str):
            set_(self, "layers", (self.layers,))
        elif self.layers is not None:
            set_(self, "layers", tuple(self.layers))
        if self.head_dtype is not None:
            set_(self, "head_dtype", head_dtype_name(self.head_dtype))
        checks = [
            (self.top_k >= 0, f"top_k must be >= 0. Got {self.top_k}."),
            (0 < self.tol < 1, f"tol must be in (0, 1). Got {self.tol}."),
            (
                self.lanczos_steps is None or self.lanczos_steps >= 1,
                f"lanczos_steps must be >= 1. Got {self.lanczos_steps}.",
            ),
            (
                self.probes >= (3 if self.trace_method == "hutchpp" else 2),
                f"probes must be >= 3 for hutchpp (2 for hutchinson). Got {self.probes}.",
            ),
            (
                self.trace_rel_stderr is None or self.trace_rel_stderr > 0,
                f"trace_rel_stderr must be positive. Got {self.trace_rel_stderr}.",
            ),
            (self.density_runs >= 1, f"density_runs must be >= 1. Got {self.density_runs}."),
            (
                self.batch_size is None or self.batch_size >= 1,
                f"batch_size must be >= 1. Got {self.batch_size}.",
            ),
        ]
        require(checks)

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready."""
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d
