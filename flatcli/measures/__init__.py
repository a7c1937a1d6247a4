"""The measures: flat library functions on a loaded checkpoint, and the registry that lists them.

>>> import flatcli
>>> run = flatcli.load("ckpt.safetensors")                       # doctest: +SKIP
>>> flatcli.measures.gamma(run, samples=100).metrics()           # doctest: +SKIP
>>> flatcli.measures.spectrum(run, top_k=5, trace=True).metrics()  # doctest: +SKIP

:func:`gamma`, :func:`spectrum` and :func:`sharpness` take a :class:`~flatcli.io.load.Run` (a
loaded checkpoint: :func:`flatcli.load`), an optional ``progress(description, done, total)``
callback and the fields of the measure's config as keywords (``seed`` and ``batch_size`` default
to the run's); each returns the measure's result, with ``metrics()`` (flat numbers, the keys of a
report's ``metrics``) and ``details()`` (JSON-ready). ``compute_*`` take a model and tensors
instead.

Importing this package registers every measure: :func:`all_measures` lists them with each
metric's direction and source (what ``flatcli measures`` prints). The names ``gamma``,
``spectrum`` and ``sharpness`` here are the functions; their modules are imported by their full
names (``from flatcli.measures.gamma import GammaConfig``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Each import registers its measures (a block at the bottom of the module), in this order. The
# registry also finds a measure module that is not imported here (registry._ensure_loaded).
from flatcli.measures import invariance as invariance  # noqa: PLC0414 - registers it
from flatcli.measures import pacbayes as pacbayes  # noqa: PLC0414 - registers pacbayes
from flatcli.measures.gamma import GammaConfig, GammaResult, compute_gamma
from flatcli.measures.kfac import KfacConfig, KfacResult, compute_kfac  # noqa: F401
from flatcli.measures.registry import (
    Direction,
    Measure,
    Metric,
    all_measures,
    compute,
    find_metric,
    get_measure,
    make_config,
    register,
    torch_warnings_silenced,
)
from flatcli.measures.sharpness import (
    SharpnessConfig,
    SharpnessResult,
    compute_sharpness,
)
from flatcli.measures.spectrum import SpectrumConfig, SpectrumResult, compute_spectrum
from flatcli.progress import ProgressFn

if TYPE_CHECKING:
    from flatcli.io.load import Run

__all__ = [
    # on a loaded checkpoint (flatcli.load)
    "gamma",
    "spectrum",
    "sharpness",
    "compute",
    # on a model and tensors
    "compute_gamma",
    "compute_spectrum",
    "compute_sharpness",
    # configs and results
    "GammaConfig",
    "GammaResult",
    "SpectrumConfig",
    "SpectrumResult",
    "SharpnessConfig",
    "SharpnessResult",
    # the registry
    "Direction",
    "Metric",
    "Measure",
    "register",
    "get_measure",
    "all_measures",
    "find_metric",
    "make_config",
]


def gamma(run: Run, *, progress: ProgressFn | None = None, **options: Any) -> GammaResult:
    """γ̂, the mean Fisher log-determinant ln|J Jᵀ| over T samples of N' examples (Jia & Su
    2020, Eq. 5), and its Gram-based baselines, on a loaded checkpoint.

    ``options``: fields of :class:`GammaConfig` (``samples``, ``trials``, ``baselines``,
    ``logit_scale``, ...). ``metrics()`` has ``gamma_hat``, ``gamma_hat_std``, ...
    """
    return compute("gamma", run, progress=progress, **options)


def spectrum(run: Run, *, progress: ProgressFn | None = None, **options: Any) -> SpectrumResult:
    """Top eigenvalues (Lanczos), trace (Hutch++; the Hessian trace of Tsuzuku et al. 2020,
    Eq. 5) and spectral density of the Hessian, GGN or Fisher, on a loaded checkpoint.

    ``options``: fields of :class:`SpectrumConfig` (``top_k``, ``trace``, ``matrix``,
    ``density``, ...). ``metrics()`` has ``top_eigenvalue``, ``trace``, ...
    """
    return compute("spectrum", run, progress=progress, **options)


def sharpness(run: Run, *, progress: ProgressFn | None = None, **options: Any) -> SharpnessResult:
    """Normalized sharpness (Tsuzuku et al. 2020, Eq. 17), matrix-normalized sharpness (Eq. 13),
    the Hessian trace (Eq. 5), ε-sharpness (Keskar et al. 2017) and adaptive sharpness (Kwon et
    al. 2021), in one computation on a loaded checkpoint.

    ``options``: fields of :class:`SharpnessConfig` (``measures`` (default: all),
    ``diag_method``, ``probes``, ...). ``metrics()`` is keyed by the measure names.
    """
    config = make_config(get_measure("normalized_sharpness"), run, **options)
    with torch_warnings_silenced():
        return compute_sharpness(run.model, run.x, run.y, config, progress=progress)
