"""What a sharpness run will cost, in gradient passes over its examples, said before the work.

One gradient pass (a forward and a backward of the mean loss over every example) is timed on
the first chunk of examples and scaled to all of them; each part's cost is a multiple of it,
measured on LeNet-5 / 4,000 digits on the CPU (``benchmarks/bench_defaults.py``): the exact GGN
diagonal about 1.5 passes per logit, a Hessian-vector product 2.3, a GGN-vector product 2.1; for
``token-ce`` the GGN diagonal's T·V rows per sequence are batched over positions and cost about
0.4 passes each (gpt-tiny, 64 tokens, 256 bytes: 38 s predicted as 38 s).
When the estimate exceeds :data:`flatcli.progress.WARN_SECONDS` one ``UserWarning`` says it,
with the options that make the run cheaper.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flatcli.configs.sharpness import DiagMethod, SharpnessConfig
from flatcli.progress import WARN_SECONDS, format_seconds

__all__ = [
    "DIAG_PASSES_PER_LOGIT",
    "DIAG_PASSES_PER_TOKEN_LOGIT",
    "HVP_PASSES",
    "GVP_PASSES",
    "ggn_diagonal_passes",
    "diagonal_passes",
    "warn_cost",
]

DIAG_PASSES_PER_LOGIT = 1.5
DIAG_PASSES_PER_TOKEN_LOGIT = 0.4
HVP_PASSES = 2.5
GVP_PASSES = 2.0


def ggn_diagonal_passes(loss: str | None, outputs: int) -> float:
    """Gradient passes of the exact GGN diagonal of ``loss`` with ``outputs`` per example."""
    per = DIAG_PASSES_PER_TOKEN_LOGIT if loss == "token-ce" else DIAG_PASSES_PER_LOGIT
    return per * outputs


def diagonal_passes(config: SharpnessConfig, classes: int, params: int) -> float:
    """Gradient passes of one curvature diagonal by ``config.diag_method``."""
    if config.diag_method == DiagMethod.GGN.value:
        return ggn_diagonal_passes(config.normalized_loss, classes)
    if config.diag_method == DiagMethod.HUTCHINSON.value:
        return HVP_PASSES * config.probes
    return HVP_PASSES * params


def _pass_seconds(model: nn.Module, x: Tensor, y: Tensor, config: SharpnessConfig) -> float:
    """Seconds of one gradient pass over all of ``x``, timed on its first chunk (the second of
    two runs: the first pays one-off costs)."""
    from flatcli.curvature._functional import FunctionalModel, head_loss
    from flatcli.curvature.losses import get_loss
    from flatcli.curvature.memory import cpu_chunk
    from flatcli.curvature.params import select_parameters
    from flatcli.measures.sharpness._worst_case import mean_loss

    fm = FunctionalModel(model, select_parameters(model, None))
    n = int(x.shape[0])
    size = config.batch_size or (cpu_chunk(model, x) if fm.device.type == "cpu" else n)
    size = min(n, size, 512)
    loss = head_loss(get_loss(config.loss), config.head)
    took = 0.0
    for _ in range(2):
        start = time.perf_counter()
        mean_loss(fm, fm.params, x[:size], y[:size], loss, size)
        took = time.perf_counter() - start
    return took * n / size


def warn_cost(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: SharpnessConfig,
    passes: Sequence[float],
    classes: int,
    diagonal: float = 0.0,
) -> float:
    """Estimate the run (``sum(passes)`` gradient passes, ``diagonal`` of them the shared
    curvature diagonal's) and warn when it exceeds :data:`WARN_SECONDS`, naming
    ``--diag-method hutchinson`` first when the diagonal is most of it; returns the estimate in
    seconds."""
    total = float(sum(passes))
    if total <= 0:
        return 0.0
    with torch.no_grad():
        per = _pass_seconds(model, x, y, config)
    estimate = per * total
    if estimate > WARN_SECONDS:
        first = (
            f"--diag-method hutchinson (the exact GGN diagonal is {diagonal:,.0f} of them), "
            if diagonal > total / 2 and config.diag_method == DiagMethod.GGN.value
            else ""
        )
        warnings.warn(
            f"sharpness: about {total:,.0f} gradient passes over {int(x.shape[0]):,} examples "
            f"× {format_seconds(per)} ≈ {format_seconds(estimate)}; {first}--max-examples, "
            "fewer --trace-probes, --eps-steps or --adaptive-steps, or fewer --measure is "
            "cheaper",
            UserWarning,
            stacklevel=2,
        )
    return estimate
