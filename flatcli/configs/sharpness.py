"""``SharpnessConfig``: what :func:`flatcli.measures.sharpness.compute_sharpness` computes and
how; its command-line flags, and how the curvature diagonal is obtained.

The measures are the sharpness definitions (``flatcli/measures/sharpness/<name>.py``), which lie
above this module: :mod:`flatcli.measures.sharpness` hands their names to :func:`known_measures`
when it is imported, and the config checks ``measures`` against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from flatcli.configs._checks import head_dtype_name, require
from flatcli.configs.choices import LossName
from flatcli.errors import UsageError, choice
from flatcli.options import choices, option, plain_dict

if TYPE_CHECKING:
    import torch

__all__ = ["DiagMethod", "TraceMethod", "SharpnessConfig", "all_measures", "known_measures"]

_names: Callable[[], tuple[str, ...]] | None = None


def known_measures(names: Callable[[], tuple[str, ...]]) -> None:
    """Take ``names()``, every sharpness definition's name in order, as the measures a config
    may name (:mod:`flatcli.measures.sharpness` calls it when it is imported)."""
    global _names
    _names = names


def all_measures() -> tuple[str, ...]:
    """Every sharpness definition's name, in order (``ALL_MEASURES``)."""
    if _names is None:
        raise RuntimeError(
            "SharpnessConfig checks its measures against the sharpness definitions: import "
            "flatcli.measures.sharpness first"
        )
    return _names()


DiagMethod = choices(
    "DiagMethod", "hutchinson ggn exact", "How the curvature diagonal is obtained."
)
TraceMethod = choices(
    "TraceMethod",
    "auto ggn-residual hutchinson hutchpp",
    "How hessian_trace is estimated: the exact GGN trace plus Hutchinson on the residual "
    "H − G (a control variate), or Hutchinson / Hutch++ on H; auto: the first where it reaches "
    "the standard error in fewer passes, else Hutchinson.",
)


def _measure_name(value: Any) -> str:
    """``value`` as a definition's name; else a UsageError listing them."""
    name = value.value if isinstance(value, Enum) else value
    valid = all_measures()
    if not isinstance(name, str) or name not in valid:
        listed = ", ".join(repr(m) for m in valid)
        raise UsageError(f"Unknown measure {value!r}; choose one of {listed}.")
    return name


@dataclass(frozen=True)
class SharpnessConfig:
    """What :func:`flatcli.measures.sharpness.compute_sharpness` computes, and how.

    Attributes:
        measures: names from :func:`all_measures` (None: all of them).
        loss: the command's loss (the common ``--loss``): of ``hessian_trace``,
            ``eps_sharpness`` and ``adaptive_sharpness``; None: the run's, else inferred from
            the targets (:meth:`resolved` fills it in).
        normalized_loss: loss of the normalized measures' Hessian; None: ``"nsce"`` (Eq. 20)
            when the loss is ``ce`` or ``nsce``, else the loss itself.
        diag_method: ``"ggn"`` (default: exact GGN diagonal, the exact Hessian diagonal of
            piecewise-linear networks), ``"hutchinson"`` (Rademacher probes and exact HVPs, as
            Algorithm 1; biased upward by the clipping) or ``"exact"`` (exact Hessian diagonal,
            one HVP per weight: small models).
        probes: Hutchinson probes for the diagonal (Algorithm 1's expectation).
        probe_groups: independently seeded groups the probes are split into (jackknife stderr).
        lam: λ of Eq. 17 (§5.3 sets 1/2; changing λ to λ' scales the value by sqrt(λ/λ')).
        solver_rtol: stop the per-layer solver when its certified gap is below this fraction.
        solver_max_iter: most alternating sweeps per layer.
        trace_method: ``"auto"`` (default: ``"ggn-residual"`` when it reaches Hutchinson's
            standard error in fewer gradient passes, else ``"hutchinson"``; see
            :func:`flatcli.measures.sharpness.hessian_trace.resolve_trace_method`),
            ``"ggn-residual"`` (``tr H = tr G + tr(H − G)``, the first exact from the GGN
            diagonal, the second by Hutchinson: about 5x less variance per probe than
            Hutchinson on H on LeNet-5, but K backward passes per example for the GGN
            diagonal), ``"hutchinson"`` or ``"hutchpp"`` (on H).
        trace_probes: Hutchinson probes for ``hessian_trace`` and the per-layer traces.
        trace_rel_stderr: stop those probes at this relative standard error (None: all).
        eps: Keskar's box size ε.
        eps_steps: ascent steps of ``eps_sharpness``.
        adaptive_rho: radius of ``adaptive_sharpness`` (None: 1e-3 for p=inf, 0.1 for p=2).
        adaptive_p: ``"inf"`` or ``"2"``.
        adaptive_steps: ascent steps of ``adaptive_sharpness``.
        step_size: ascent step as a fraction of the radius (both worst-case measures).
        batch_size: examples per chunk (None: chosen to fit memory, or all for the ascent).
        head_dtype: ``"float64"`` (default: the curvature of confident examples, whose
            ``1 − p(y|x)`` rounds away in float32) or ``"float32"`` or None (model dtype).
        seed: seeds every probe.
        force: run ``diag_method="exact"`` even when its estimated time exceeds an hour.
    """

    measures: tuple[str, ...] | None = option(
        None,
        "--measure",
        "Measure to compute (repeatable; default all; `flatcli measures` lists them).",
        repeatable=True,
    )
    normalized_loss: str | None = option(
        None,
        "--normalized-loss",
        "Loss of the normalized measures' Hessian. Default: nsce (Eq. 20) when --loss is ce "
        "or nsce, else --loss.",
        choices=LossName,
    )
    diag_method: str = option(
        "ggn",
        "--diag-method",
        "Hessian diagonal: hutchinson (HVP probes), ggn (exact GGN), exact (small models).",
        choices=DiagMethod,
    )
    probes: int = option(100, "--probes", "Hutchinson probes for the Hessian diagonal.", min=2)
    probe_groups: int = option(
        10,
        "--probe-groups",
        "Seeded probe groups (jackknife stderr of normalized sharpness).",
        min=1,
    )
    lam: float = option(0.5, "--lam", "λ of Eq. 17 (the paper uses 1/2).")
    solver_rtol: float = option(
        1e-9,
        "--solver-rtol",
        "Stop each layer's solver when its certified gap is below this fraction.",
    )
    solver_max_iter: int = 20000
    trace_method: str = option(
        "auto",
        "--trace-method",
        "hessian_trace: ggn-residual (exact GGN trace + Hutchinson on H − G), hutchinson, "
        "hutchpp; auto: ggn-residual where it is the cheaper for the same stderr.",
        choices=TraceMethod,
    )
    trace_probes: int = option(
        10, "--trace-probes", "Hutchinson probes for traces (hutchpp: products).", min=2
    )
    trace_rel_stderr: float | None = option(
        None, "--trace-rel-stderr", "Stop trace probes at this relative stderr."
    )
    eps: float = option(1e-3, "--eps", "Keskar's box size ε of eps_sharpness.")
    eps_steps: int = option(20, "--eps-steps", "Ascent steps of eps_sharpness.", min=0)
    adaptive_rho: float | None = option(
        None, "--rho", "Radius of adaptive_sharpness (default 1e-3 for p=inf, 0.1 for p=2)."
    )
    adaptive_p: str = option("inf", "--p", "Norm of adaptive_sharpness: inf or 2.")
    adaptive_steps: int = option(
        20, "--adaptive-steps", "Ascent steps of adaptive_sharpness.", min=0
    )
    step_size: float = option(0.25, "--step-size", "Ascent step as a fraction of the radius.")
    batch_size: int | None = None
    head_dtype: str | None = option(
        "float64", "--head-dtype", "dtype of the loss head (float64 keeps confident examples)."
    )
    seed: int = 0
    loss: str | None = None  # not a flag: the common --loss (None: the run's, else inferred)
    force: bool = option(
        False,
        "--force",
        "Run --diag-method exact (one Hessian-vector product per parameter) even when its "
        "estimated time is over an hour.",
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.measures is None:
            measures = all_measures()
        elif isinstance(self.measures, str):
            measures = (self.measures,)
        else:
            measures = tuple(self.measures)
        if not measures:
            raise UsageError(f"Choose at least one measure of {list(all_measures())}.")
        set_(self, "measures", tuple(dict.fromkeys(_measure_name(m) for m in measures)))
        for name in ("loss", "normalized_loss"):
            if getattr(self, name) is not None:
                set_(self, name, choice(LossName, getattr(self, name), "loss"))
        set_(self, "diag_method", choice(DiagMethod, self.diag_method, "diag method"))
        set_(self, "trace_method", choice(TraceMethod, self.trace_method, "trace method"))
        set_(self, "adaptive_p", str(self.adaptive_p).lower().removeprefix("l"))
        if self.head_dtype is not None:
            set_(self, "head_dtype", head_dtype_name(self.head_dtype))
        checks = [
            (self.probes >= 2, f"probes must be >= 2. Got {self.probes}."),
            (self.probe_groups >= 1, f"probe_groups must be >= 1. Got {self.probe_groups}."),
            (self.lam > 0, f"lam must be > 0. Got {self.lam}."),
            (0 < self.solver_rtol < 1, f"solver_rtol must be in (0, 1). Got {self.solver_rtol}."),
            (
                self.solver_max_iter >= 1,
                f"solver_max_iter must be >= 1. Got {self.solver_max_iter}.",
            ),
            (self.trace_probes >= 2, f"trace_probes must be >= 2. Got {self.trace_probes}."),
            (
                self.trace_rel_stderr is None or self.trace_rel_stderr > 0,
                f"trace_rel_stderr must be positive. Got {self.trace_rel_stderr}.",
            ),
            (self.eps > 0, f"eps must be > 0. Got {self.eps}."),
            (self.eps_steps >= 0, f"eps_steps must be >= 0. Got {self.eps_steps}."),
            (
                self.adaptive_rho is None or self.adaptive_rho > 0,
                f"adaptive_rho must be > 0. Got {self.adaptive_rho}.",
            ),
            (
                self.adaptive_p in ("inf", "2"),
                f"adaptive_p must be 'inf' or '2'. Got {self.adaptive_p!r}.",
            ),
            (self.adaptive_steps >= 0, f"adaptive_steps must be >= 0. Got {self.adaptive_steps}."),
            (self.step_size > 0, f"step_size must be > 0. Got {self.step_size}."),
            (
                self.batch_size is None or self.batch_size >= 1,
                f"batch_size must be >= 1. Got {self.batch_size}.",
            ),
        ]
        require(checks)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values (the report's ``config``)."""
        return plain_dict(self)

    def resolved(self, loss: str) -> SharpnessConfig:
        """This config with ``loss`` (when unset) and ``normalized_loss`` filled in: NSCE for
        the class losses (Tsuzuku et al. 2020, Eq. 20), else the command's loss."""
        from dataclasses import replace

        loss = self.loss or loss
        normalized = self.normalized_loss or ("nsce" if loss in ("ce", "nsce") else loss)
        return replace(self, loss=loss, normalized_loss=normalized)

    @property
    def head(self) -> torch.dtype | None:
        """The loss head's dtype (None: the model's)."""
        from flatcli.dtypes import DTYPES

        return None if self.head_dtype is None else DTYPES[self.head_dtype]
