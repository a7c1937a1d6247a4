"""Stochastic estimates of the trace and the diagonal of a symmetric operator, with standard errors.

Hutchinson (1989): for Rademacher ``z`` (entries ±1), ``E[zᵀ A z] = tr(A)`` and
``E[z ⊙ A z] = diag(A)``; the mean of ``p`` probes has standard error ``s / √p`` with ``s`` the
sample standard deviation of the probes (for Rademacher probes ``Var(zᵀ A z) =
2 Σ_{i≠j} A_ij²``).

Hutch++ (Meyer, Musco, Musco & Woodruff, *SOSA* 2021, Algorithm 1): spend a third of the
budget on a sketch ``S``, take ``Q = orth(A S)``, compute ``tr(Qᵀ A Q)`` exactly and estimate
the rest, ``tr((I − QQᵀ) A (I − QQᵀ))``, with Hutchinson on the remaining third. When a few
eigenvalues dominate (the outliers of a network's Hessian or GGN), ``Q`` captures them and the
residual Hutchinson has far smaller variance. Since the two parts add to ``tr(A)`` for any
``Q``, the estimate's standard error is that of the residual part.

Stopping: with ``target_rel_stderr`` the probes stop once the standard error falls below that
fraction of the estimate (never on the change of the running mean, which stops early and low:
PyHessian's rule was measured 6 % low on a trained network).

>>> import torch
>>> from flatcli.curvature.linop import DenseOperator
>>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
>>> hutchinson(DenseOperator(A), probes=4).value  # diagonal: every Rademacher probe is exact
55.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flatcli.curvature.linop import LinearOperator, apply_float64, random_vectors, work_device
from flatcli.distributed import broadcast_for
from flatcli.progress import ProgressFn, no_progress

__all__ = ["TraceEstimate", "hutchinson", "hutchpp", "hutchinson_diagonal"]

DEFAULT_BLOCK = 10
"""Probes per ``matmat`` call (and the granularity of the adaptive stop)."""

MIN_PROBES = 10
"""Fewest probes before an adaptive stop: the sample std of fewer is too noisy to trust."""


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate.

    Attributes:
        value: the estimate of ``tr(A)``.
        stderr: its standard error (sample std of the Hutchinson probes / √probes); NaN with
            fewer than two probes.
        probes: Hutchinson probes behind ``stderr`` (for Hutch++, those of the residual part).
        matvecs: products spent in total.
    """

    value: float
    stderr: float
    probes: int
    matvecs: int

    @property
    def rel_stderr(self) -> float:
        """``stderr / |value|``."""
        return self.stderr / abs(self.value) if self.value else math.inf


def _mean_stderr(samples: Tensor) -> tuple[float, float]:
    n = samples.numel()
    mean = float(samples.mean())
    if n < 2:
        return mean, math.nan
    return mean, float(samples.std(correction=1)) / math.sqrt(n)


def _probe_samples(
    op: LinearOperator,
    count: int,
    generator: torch.Generator,
    *,
    offset: float = 0.0,
    project: Tensor | None = None,
    target_rel_stderr: float | None = None,
    block_size: int = DEFAULT_BLOCK,
    min_probes: int = MIN_PROBES,
    progress: ProgressFn = no_progress,
) -> Tensor:
    """Up to ``count`` samples ``zᵀ P A P z`` (``P = I − QQᵀ`` when ``project`` is ``Q``).

    With a target, stops after the first block at which ``stderr <= target · |offset + mean|``
    and at least ``min_probes`` samples are in. ``progress(done)`` after each block.
    """
    device = work_device(op)
    parts: list[Tensor] = []
    done = 0
    while done < count:
        b = min(block_size, count - done)
        Z = broadcast_for(op, random_vectors(op.dim, b, generator, "rademacher", device))
        if project is not None:
            Z = Z - project @ (project.T @ Z)
        parts.append((Z * apply_float64(op, Z)).sum(dim=0))
        done += b
        progress(done)
        if target_rel_stderr is not None and done >= max(2, min_probes):
            mean, stderr = _mean_stderr(torch.cat(parts))
            if stderr <= target_rel_stderr * abs(offset + mean):
                break
    return torch.cat(parts).cpu()


def _check(probes: int, least: int, name: str) -> None:
    if probes < least:
        raise ValueError(f"{name} needs probes >= {least}. Got probes={probes}.")


def hutchinson(
    op: LinearOperator,
    probes: int = 100,
    seed: int = 0,
    target_rel_stderr: float | None = None,
    *,
    offset: float = 0.0,
    block_size: int = DEFAULT_BLOCK,
    min_probes: int = MIN_PROBES,
    progress: ProgressFn | None = None,
) -> TraceEstimate:
    """Hutchinson's trace estimate with Rademacher probes and its standard error.

    ``offset`` is a known part of the trace the estimate is added to (a control variate's
    exact trace); the relative target is then of the total.

    Args:
        op: a symmetric operator.
        probes: number of probes (one product each); with a target, the most to use.
        seed: seeds the probes.
        target_rel_stderr: stop once ``stderr <= target · |offset + estimate|`` (checked
            every ``block_size`` probes, after ``min_probes``).
        offset: added to the estimate (no error of its own).
        block_size: probes per ``matmat``.
        min_probes: fewest probes before an adaptive stop.
        progress: called as ``progress("trace", probes done, probes)`` after each block.

    Returns:
        A :class:`TraceEstimate`.
    """
    _check(probes, 1, "hutchinson")
    report = progress or no_progress
    start = op.matvecs
    samples = _probe_samples(
        op,
        probes,
        torch.Generator().manual_seed(seed),
        offset=offset,
        target_rel_stderr=target_rel_stderr,
        block_size=block_size,
        min_probes=min_probes,
        progress=lambda done: report("trace", done, probes),
    )
    value, stderr = _mean_stderr(samples)
    return TraceEstimate(offset + value, stderr, samples.numel(), op.matvecs - start)


def hutchpp(
    op: LinearOperator,
    probes: int = 99,
    seed: int = 0,
    target_rel_stderr: float | None = None,
    *,
    block_size: int = DEFAULT_BLOCK,
    min_probes: int = MIN_PROBES,
    progress: ProgressFn | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021, Alg. 1): ``tr(Qᵀ A Q) + Hutchinson((I−QQᵀ) A (I−QQᵀ))``.

    The budget of ``probes`` products is split in thirds: ``s = probes // 3`` for the sketch
    ``A S``, ``s`` for ``A Q``, the rest for the residual Hutchinson probes.

    Args:
        op: a symmetric operator.
        probes: total budget of products (at least 3).
        seed: seeds the sketch and the probes.
        target_rel_stderr: stop the residual probes once the standard error is below this
            fraction of the estimate.
        block_size: residual probes per ``matmat``.
        min_probes: fewest residual probes before an adaptive stop.
        progress: called as ``progress("trace", products done, probes)`` after the sketch,
            ``A Q`` and each block of residual probes.

    Returns:
        A :class:`TraceEstimate` whose ``stderr`` and ``probes`` are those of the residual part.
    """
    _check(probes, 3, "hutchpp")
    start = op.matvecs
    generator = torch.Generator().manual_seed(seed)
    s = probes // 3
    S = broadcast_for(op, random_vectors(op.dim, s, generator, "rademacher", work_device(op)))
    report = progress or no_progress
    Q, _ = torch.linalg.qr(apply_float64(op, S))  # (dim, s), orthonormal columns
    report("trace", s, probes)
    low = float((Q * apply_float64(op, Q)).sum())  # tr(Qᵀ A Q)
    report("trace", 2 * s, probes)
    samples = _probe_samples(
        op,
        probes - 2 * s,
        generator,
        offset=low,
        project=Q,
        target_rel_stderr=target_rel_stderr,
        block_size=block_size,
        min_probes=min_probes,
        progress=lambda done: report("trace", 2 * s + done, probes),
    )
    rest, stderr = _mean_stderr(samples)
    return TraceEstimate(low + rest, stderr, samples.numel(), op.matvecs - start)


def hutchinson_diagonal(
    op: LinearOperator,
    probes: int = 100,
    seed: int = 0,
    *,
    block_size: int = DEFAULT_BLOCK,
    progress: ProgressFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate of ``diag(A)`` (Bekas, Kokiopoulou & Saad 2007) and its stderr.

    The mean of ``z ⊙ A z`` over Rademacher probes; entry ``i`` of one probe has variance
    ``Σ_{j≠i} A_ij²``. Moments are merged block by block (Chan et al.'s pairwise update), so
    memory stays ``O(dim · block_size)``.

    Args:
        op: a symmetric operator.
        probes: number of probes (one product each).
        seed: seeds the probes.
        block_size: probes per ``matmat``.
        progress: called as ``progress("diagonal probes", probes done, probes)`` after each
            block.

    Returns:
        ``(diagonal, stderr)``: float64 ``(dim,)`` tensors on the operator's (work) device;
        ``stderr`` is NaN with one probe.
    """
    _check(probes, 1, "hutchinson_diagonal")
    generator = torch.Generator().manual_seed(seed)
    device = work_device(op)
    mean = torch.zeros(op.dim, dtype=torch.float64, device=device)
    m2 = torch.zeros_like(mean)
    count = 0
    while count < probes:
        b = min(block_size, probes - count)
        Z = broadcast_for(op, random_vectors(op.dim, b, generator, "rademacher", device))
        X = Z * apply_float64(op, Z)  # (dim, b) samples of diag(A)
        xm = X.mean(dim=1)
        delta = xm - mean
        total = count + b
        mean += delta * (b / total)
        m2 += ((X - xm[:, None]) ** 2).sum(dim=1) + delta**2 * (count * b / total)
        count = total
        if progress is not None:
            progress("diagonal probes", count, probes)
    if count < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, (m2 / (count - 1)).sqrt() / math.sqrt(count)
