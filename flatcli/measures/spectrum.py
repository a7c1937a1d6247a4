"""The spectrum of a network's curvature: top eigenvalues, trace and spectral density.

Composes the curvature core: :func:`~flatcli.curvature.operators.make_operator` (Hessian, GGN or
Fisher of the mean loss over the examples), :func:`~flatcli.curvature.lanczos.lanczos` (the
``top_k`` extreme eigenvalues with their residuals), :func:`~flatcli.curvature.trace.hutchpp`
or :func:`~flatcli.curvature.trace.hutchinson` (the trace with a standard error) and
:func:`~flatcli.curvature.density.spectral_density` (stochastic Lanczos quadrature, Ghorbani et
al. 2019). The largest Hessian eigenvalue and the trace are the classic sharpness measures
(Keskar et al. 2017; Wu et al. 2020, §1); the density shows the bulk and the ~c outliers
that Wu et al. 2020, §4.4, describe.

Per-layer mode repeats eigenvalue and trace for one block per parameterised module: the
operator restricted to that module's parameters, i.e. the diagonal block of the full matrix
(the layer-wise Hessian of Wu et al. 2020, §3). The blocks are
:meth:`~flatcli.curvature.operators.CurvatureOperator.restrict` of the one operator, so the
matrix is built (probed, its labels sampled, its graph cached) once.

The model is differentiated in the mode it is in (``details()["mode"]``): put it in eval mode
unless BatchNorm batch statistics are what you mean to measure.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatcli.configs.choices import ALL_LOSSES, CLASS_LOSSES
from flatcli.configs.spectrum import Kind, SpectrumConfig, TraceMethod
from flatcli.curvature.density import Density, spectral_density
from flatcli.curvature.lanczos import (
    EigenResult,
    LanczosMemory,
    basis_size,
    choose_basis_dtype,
    lanczos,
    lanczos_memory,
)
from flatcli.curvature.losses import infer_loss
from flatcli.curvature.memory import available_memory
from flatcli.curvature.operators import (
    CurvatureOperator,
    OperatorBlock,
    OperatorCache,
)
from flatcli.curvature.params import select_parameters
from flatcli.curvature.trace import TraceEstimate, hutchinson, hutchpp
from flatcli.dtypes import DTYPES
from flatcli.errors import UsageError
from flatcli.measures._config import finite_or_none as _finite_or_none
from flatcli.measures._config import floats as _floats
from flatcli.progress import Budget, ProgressFn

__all__ = [
    "TraceMethod",
    "SpectrumConfig",
    "LayerSpectrum",
    "SpectrumResult",
    "check_spectrum",
    "compute_spectrum",
]

DENSITY_STEPS = 90
"""Lanczos steps per density run when ``lanczos_steps`` is not given (PyHessian uses 100)."""


@dataclass(frozen=True)
class LayerSpectrum:
    """Top eigenvalue and trace of one module's diagonal block."""

    name: str
    num_params: int
    top_eigenvalue: float | None
    trace: float | None
    trace_stderr: float | None
    matvecs: int

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SpectrumResult:
    """What :func:`compute_spectrum` measured; None for what was not requested.

    ``eigenvectors`` is ``(num_params, top_k)`` (operator dtype and device) when requested, with
    ``slices`` mapping parameter names to rows; ``eigenvectors_file`` is where a caller saved
    them (reported in ``details()``). ``max_basis`` is the cap :func:`check_spectrum` put on
    the Krylov basis to fit the memory (None: none).
    """

    config: SpectrumConfig
    num_params: int
    eigen: EigenResult | None
    trace: TraceEstimate | None
    density: Density | None
    per_layer: list[LayerSpectrum] | None
    matvecs: int
    mode: str
    operator: dict[str, Any]
    slices: dict[str, slice] = field(repr=False)
    eigenvectors: Tensor | None = field(default=None, repr=False)
    eigenvectors_file: str | None = None
    max_basis: int | None = None

    @property
    def eigenvalues(self) -> list[float] | None:
        return None if self.eigen is None else self.eigen.eigenvalues.tolist()

    def metrics(self) -> dict[str, float | int | None]:
        """``{top_eigenvalue, trace, trace_stderr, num_params, matvecs}`` (flat numbers)."""
        top = None if not self.eigenvalues else self.eigenvalues[0]
        return {
            "top_eigenvalue": _finite_or_none(top),
            "trace": _finite_or_none(None if self.trace is None else self.trace.value),
            "trace_stderr": _finite_or_none(None if self.trace is None else self.trace.stderr),
            "num_params": self.num_params,
            "matvecs": self.matvecs,
        }

    def details(self) -> dict[str, Any]:
        """Eigenvalues, residuals, density, per-layer blocks and how the products were formed."""
        eig = self.eigen
        out: dict[str, Any] = {
            "matrix": self.config.matrix,
            "which": self.config.which,
            "eigenvalues": None if eig is None else _floats(eig.eigenvalues),
            "residuals": None if eig is None else _floats(eig.residuals),
            "lanczos": None
            if eig is None
            else {
                "converged": eig.converged,
                "steps": eig.steps,
                "tol": self.config.tol,
                "max_basis": self.max_basis,
            },
            "trace": None
            if self.trace is None
            else {
                "method": self.config.trace_method,
                "value": _finite_or_none(self.trace.value),
                "stderr": _finite_or_none(self.trace.stderr),
                "probes": self.trace.probes,
                "matvecs": self.trace.matvecs,
            },
            "density": None
            if self.density is None
            else {
                "grid": _floats(self.density.grid),
                "values": _floats(self.density.values),
                "sigma": self.density.sigma,
                "runs": self.density.runs,
                "mean": _finite_or_none(self.density.mean),
            },
            "per_layer": None if self.per_layer is None else [b.to_dict() for b in self.per_layer],
            "mode": self.mode,
            "hvp_method": self.operator.get("hvp_method"),
            "operator": self.operator,
        }
        if self.eigenvectors_file is not None:
            out["eigenvectors_file"] = self.eigenvectors_file
        reasons = {
            k: "not finite (the curvature overflowed or the model produced NaN)"
            for k, v in self.metrics().items()
            if v is None and self._requested(k)
        }
        if reasons:
            out["nonfinite"] = reasons
        return out

    def _requested(self, metric: str) -> bool:
        if metric == "top_eigenvalue":
            return self.config.top_k > 0
        return metric.startswith("trace") and self.config.trace


def _layer_blocks(model: nn.Module, selected: list[str]) -> list[tuple[str, list[str]]]:
    """``(module name, its selected parameter names)`` for each module holding parameters."""
    chosen = set(selected)
    blocks = []
    for name, module in model.named_modules():
        names = [
            f"{name}.{p}" if name else p
            for p, t in module.named_parameters(recurse=False)
            if t.requires_grad
        ]
        names = [n for n in names if n in chosen]
        if names:
            blocks.append((name or "(root)", names))
    return blocks


def _trace(
    op: CurvatureOperator | OperatorBlock, config: SpectrumConfig, progress: ProgressFn
) -> TraceEstimate:
    estimator = hutchpp if config.trace_method == TraceMethod.HUTCHPP else hutchinson
    return estimator(op, config.probes, config.seed, config.trace_rel_stderr, progress=progress)


_PRODUCTS = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher"}


def _budget(
    progress: ProgressFn | None, config: SpectrumConfig, dim: int, layer_dims: list[int]
) -> Budget:
    """The run's products, stage by stage (the order :func:`compute_spectrum` spends them),
    and the options that lower the costly ones."""
    total, cheaper = 0, ["--max-examples"]
    if config.top_k > 0:
        total += basis_size(dim, config.top_k, config.lanczos_steps)[0]
        cheaper.append("a smaller --top-k")
    if config.trace:
        total += config.probes
        cheaper.append("fewer --probes")
    if config.density:
        total += config.density_runs * min(config.lanczos_steps or DENSITY_STEPS, dim)
        cheaper.append("fewer --density-runs")
    for d in layer_dims:
        total += (basis_size(d, 1)[0] if config.top_k > 0 else 0) + config.probes * config.trace
    if layer_dims:
        cheaper.append("no --per-layer")
    if config.top_k > 0 or config.density:
        cheaper.append("a smaller --lanczos-steps")
    return Budget(
        progress,
        "spectrum",
        total,
        unit=f"{_PRODUCTS.get(config.matrix, config.matrix)}-vector products",
        cheaper=", ".join(cheaper[:-1]) + " or " + cheaper[-1],
        may_stop_early=config.top_k > 0 or config.trace_rel_stderr is not None,
    )


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_spectrum(model: nn.Module, config: SpectrumConfig, loss: str | None = None) -> int | None:
    """Refuse, before anything is allocated, a spectrum that cannot be computed on ``model``;
    return the cap on the eigenvalues' Krylov basis that makes it fit (None: no cap needed).

    ``top_k`` must not exceed the number of parameters analysed (all trainable parameters, or
    those ``layers`` selects): the matrix has no more eigenvalues. The Lanczos runs' vectors
    (float64, or float32 for a float32 model whose float64 basis would not fit: what
    :func:`~flatcli.curvature.lanczos.lanczos` then stores) plus the model's copies
    (:func:`~flatcli.curvature.lanczos.lanczos_memory`) must fit
    in the memory available on the model's device
    (:func:`~flatcli.curvature.memory.available_memory`). When they do not, the eigenvalues'
    basis is capped (``lanczos(max_basis=...)``: thick restarts, more products for the same
    tolerance) at the most vectors that fit, down to ``top_k + 2``; below that the run is
    refused.

    Raises:
        UsageError: a layer pattern that matches nothing, ``top_k`` above the parameter count,
            ``lanczos_steps`` below ``top_k``, or an estimate above the available memory (the
            message gives both and the option that lowers it).
    """
    loss = loss or config.loss
    if config.matrix == Kind.FISHER and loss is not None and loss not in CLASS_LOSSES:
        raise UsageError(
            f"--matrix fisher needs a predictive distribution over classes (loss ce or nsce); "
            f"loss {loss}: use --matrix ggn (the exact Fisher of bce/token-ce equals the GGN)"
        )
    selected = select_parameters(model, config.layers)
    named = dict(model.named_parameters())
    dim = sum(named[n].numel() for n in selected)
    what = (
        "all trainable parameters"
        if config.layers is None
        else f"those of --layer {' '.join(config.layers)}"
    )
    k = config.top_k
    if k > dim:
        raise UsageError(
            f"--top-k {k} is more than the {dim} parameters analysed ({what}): the matrix has "
            f"{dim} eigenvalues; pass --top-k {dim} or less"
        )
    if k > 0 and config.lanczos_steps is not None and config.lanczos_steps < k:
        raise UsageError(
            f"--lanczos-steps {config.lanczos_steps} is less than --top-k {k}: Lanczos needs at "
            f"least one product per eigenvalue; raise --lanczos-steps or lower --top-k"
        )
    p0 = next(iter(model.parameters()), None)
    if p0 is None or dim == 0:
        return None
    density_steps = (config.lanczos_steps or DENSITY_STEPS) if config.density else 0
    eigen = lanczos_memory(dim, k, config.lanczos_steps, return_vectors=config.eigenvectors)
    estimate = functools.partial(
        lanczos_memory,
        dim,
        k,
        config.lanczos_steps,
        density_steps=density_steps,
        return_vectors=config.eigenvectors,
        model_params=sum(p.numel() for p in model.parameters()),
        dtype=p0.dtype,
    )
    need = estimate()
    device = p0.device if p0.device.type != "mps" else "cpu"  # no float64 on MPS: on the CPU
    free = available_memory(device)
    basis = "float64"
    if need.bytes > free and p0.dtype.itemsize <= 4:
        basis = "float32"
        # a float64 basis this large is over the memory budget: lanczos stores it in float32
        need = estimate(basis_dtype=basis)
    if need.bytes <= free:
        return None
    cap = _basis_cap(estimate, dim, config, p0.dtype, device, free)
    if cap is not None:
        return cap
    lower = (
        "lower --top-k (or --lanczos-steps)"
        if k > 0 and eigen.vectors >= need.vectors
        else "lower --lanczos-steps (the steps of each density run)"
    )
    raise UsageError(
        f"spectrum needs about {_size(need.bytes)} for its Lanczos vectors ({need.vectors} "
        f"{basis} vectors of {dim} parameters, plus the model), more than the "
        f"{_size(free)} available on {device}; {lower}, or restrict the parameters with --layer"
    )


def _basis_cap(
    estimate: Callable[..., LanczosMemory],
    dim: int,
    config: SpectrumConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    free: int,
) -> int | None:
    """The most basis vectors (``max_basis``, at least ``top_k + 2``) with which the eigenvalues'
    Lanczos run fits in ``free`` bytes by ``estimate`` (:func:`lanczos_memory` with the run's
    other arguments), its basis in the dtype :func:`lanczos` would pick; None when none fits or
    the density runs alone do not."""
    k = config.top_k
    if k == 0:
        return None

    def fits(cap: int) -> bool:
        basis = choose_basis_dtype(dtype, dim, cap + 1, device)
        return estimate(basis_dtype=basis, max_basis=cap).bytes <= free

    low = k + 2  # the largest cap in [low, high] that fits, by bisection
    high = basis_size(dim, k, config.lanczos_steps)[1] - 1
    if high < low or not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def compute_spectrum(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: SpectrumConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    operators: OperatorCache | None = None,
) -> SpectrumResult:
    """Top eigenvalues, trace and density of the curvature of the mean loss over ``(x, y)``.

    Args:
        model: the network, in the mode it should be differentiated in.
        x: inputs (N, ...).
        y: int64 labels (N,).
        config: what to compute (default :class:`SpectrumConfig()`: the top 10 Hessian
            eigenvalues).
        progress: called as ``progress(description, done, total)``, counted in products out of
            the run's budget (every Lanczos step budget, trace probe and density step; a stage
            that stops early jumps to its budget). Once the second product is timed, an
            estimate above :data:`flatcli.progress.WARN_SECONDS` is said in a ``UserWarning``
            naming the options that make it cheaper.
        operators: an :class:`~flatcli.curvature.operators.OperatorCache` of ``(model, x, y)``
            (with this config's batch size and seed) to take the operator from, shared with
            other measures of the same checkpoint; default a new one.

    Returns:
        A :class:`SpectrumResult`.

    Raises:
        UsageError: a bad option, a layer pattern that matches nothing, or a request
            :func:`check_spectrum` refuses (``top_k`` above the parameter count, more memory
            than is available).
    """
    config = config or SpectrumConfig()
    if config.loss is None:  # the library call without a loss: inferred from the targets
        config = dataclasses.replace(config, loss=infer_loss(y))
    max_basis = check_spectrum(model, config)
    head_dtype = None if config.head_dtype is None else DTYPES[config.head_dtype]
    selected = select_parameters(model, config.layers)
    blocks = _layer_blocks(model, selected) if config.per_layer else []
    ops = (
        operators
        if operators is not None
        else OperatorCache(model, x, y, batch_size=config.batch_size, seed=config.seed)
    )
    trainable = set(select_parameters(model, None))
    full = ops.get(
        config.matrix,
        loss_fn=config.loss,
        head_dtype=head_dtype,
        hvp_method=config.hvp_method,
        # --layers may name frozen parameters: then an operator of its own over exactly those
        params=None if set(selected) <= trainable else selected,
    )
    # a block of the shared operator: its own product count, even when it is all of it
    op = full.restrict(selected)
    named = dict(model.named_parameters())
    layer_dims = [sum(named[n].numel() for n in params) for _, params in blocks]
    budget = _budget(progress, config, op.dim, layer_dims)
    eigen = trace = density = None
    if config.top_k > 0:
        steps = basis_size(op.dim, config.top_k, config.lanczos_steps)[0]
        eigen = lanczos(
            op,
            config.top_k,
            config.which,
            steps=config.lanczos_steps,
            tol=config.tol,
            seed=config.seed,
            return_vectors=config.eigenvectors,
            progress=budget.stage("eigenvalues", steps),
            max_basis=max_basis,
        )
    if config.trace:
        trace = _trace(op, config, budget.stage("trace", config.probes))
    if config.density:
        m = min(config.lanczos_steps or DENSITY_STEPS, op.dim)
        density = spectral_density(
            op,
            config.density_runs,
            m,
            config.seed,
            progress=budget.stage("density", config.density_runs * m),
        )
    matvecs = op.matvecs

    per_layer = None
    if config.per_layer:
        per_layer = []
        for name, params in blocks:
            block = full.restrict(params)
            top = None
            if config.top_k > 0:
                top = float(
                    lanczos(
                        block,
                        1,
                        config.which,
                        tol=config.tol,
                        seed=config.seed,
                        progress=budget.stage(f"layer {name}", basis_size(block.dim, 1)[0]),
                    ).eigenvalues[0]
                )
            est = None
            if config.trace:
                est = _trace(block, config, budget.stage(f"layer {name} trace", config.probes))
            per_layer.append(
                LayerSpectrum(
                    name=name,
                    num_params=block.dim,
                    top_eigenvalue=top,
                    trace=None if est is None else est.value,
                    trace_stderr=None if est is None else est.stderr,
                    matvecs=block.matvecs,
                )
            )
            matvecs += block.matvecs
    budget.finish()

    return SpectrumResult(
        config=config,
        num_params=op.dim,
        eigen=eigen,
        trace=trace,
        density=density,
        per_layer=per_layer,
        matvecs=matvecs,
        mode="train" if model.training else "eval",
        operator=op.describe(),
        slices=dict(op.slices),
        eigenvectors=None if eigen is None else eigen.eigenvectors,
        max_basis=max_basis,
    )


# --- registration (flatcli.measures.registry) -------------------------------------------------
from flatcli.measures import registry as _registry  # noqa: E402 - registers the finished module


def save_eigenvectors(result: SpectrumResult, run: Any, folder: Path) -> str:
    """Write ``<folder>/<checkpoint stem>.eigenvectors.safetensors``: one ``(k, *shape)`` tensor
    per parameter (row i is eigenvector i) and ``eigenvalues`` (k,); returns the path.

    Under ``torchrun`` every process holds the same (replicated) eigenvectors and only rank 0
    writes the file; the others return the same path.
    """
    from safetensors.torch import save_file

    from flatcli import distributed
    from flatcli.curvature.params import unflatten_columns
    from flatcli.io.atomic import atomic_path

    assert result.eigen is not None and result.eigenvectors is not None
    shapes = {n: p.shape for n, p in run.model.named_parameters() if n in result.slices}
    tensors = unflatten_columns(result.eigenvectors.detach(), shapes)
    tensors = {n: t.contiguous().cpu() for n, t in tensors.items()}
    tensors["eigenvalues"] = result.eigen.eigenvalues.clone()
    path = Path(folder) / f"{Path(run.checkpoint.path).stem}.eigenvectors.safetensors"
    if distributed.is_main():
        meta = {"flatcli.matrix": result.config.matrix, "flatcli.which": result.config.which}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    return str(path)


def _spectrum_reports(config: SpectrumConfig) -> list[str]:
    keys = ["top_eigenvalue"] if config.top_k > 0 else []
    keys += ["trace", "trace_stderr"] if config.trace else []
    return [*keys, "num_params", "matvecs"]


_S, _N = _registry.Direction.SHARPER, _registry.Direction.NEUTRAL
_registry.register_measure(
    "spectrum",
    SpectrumConfig,
    _registry.on_run(compute_spectrum),
    metrics=(
        _registry.Metric(
            "top_eigenvalue",
            _S,
            "Keskar et al. 2017; Wu et al. 2020, §1",
            "largest eigenvalue of the Hessian (or --matrix ggn/fisher; --which picks the "
            "end of the spectrum), by Lanczos",
        ),
        _registry.Metric(
            "trace",
            _S,
            "Tsuzuku et al. 2020, Eq. 5",
            "trace of the curvature matrix (Hutch++ or Hutchinson)",
        ),
        _registry.Metric("trace_stderr", _N, "-", "standard error of the trace estimate"),
        _registry.NUM_PARAMS,
        _registry.Metric(
            "matvecs", _N, "-", "curvature-vector products spent (each a pass over the data)"
        ),
    ),
    cost="top-k: up to max(20k, 100) products; --trace: --probes products; --density: "
    "runs × 90 products (a product = one forward+backward pass over the examples)",
    reports=_spectrum_reports,
    check=lambda run, config: check_spectrum(run.model, config, _registry.loss_of(run, config)),
    losses=ALL_LOSSES,
)
