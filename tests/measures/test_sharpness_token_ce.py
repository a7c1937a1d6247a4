"""``hessian_trace`` of a ``token-ce`` language model: the exact GGN trace of its default
``ggn-residual`` estimator against dense float64 truth (issue #23: the head's T·V rows per
sequence are formed a block at a time, in bounded memory)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev
from torch.nn import functional as F

from flatcli.measures.sharpness import SharpnessConfig, compute_sharpness
from tests.cases import TiedLM
from tests.references import flat_logits

V = 6


def _dense(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The dense Hessian and GGN of the token-ce sample loss, float64, by torch.func."""
    theta, logits = flat_logits(model, x)

    def ref(z: Tensor) -> Tensor:
        return F.cross_entropy(z.reshape(-1, V), y.reshape(-1), ignore_index=-100)

    z = logits(theta).detach()
    J = jacrev(logits)(theta).reshape(z.numel(), -1)
    Hz = hessian(lambda zz: ref(zz.view(z.shape)))(z.flatten())
    return hessian(lambda t: ref(logits(t)))(theta), J.T @ Hz @ J


def test_hessian_trace_of_a_tied_language_model() -> None:
    torch.manual_seed(0)
    model = TiedLM().double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (5, 6), generator=g)
    y = torch.randint(0, V, (5, 6), generator=g)
    y[1, :2] = -100
    H, G = _dense(model, x, y)
    config = SharpnessConfig(
        measures=("hessian_trace",), loss="token-ce", trace_probes=600, batch_size=2
    )
    res = compute_sharpness(model, x, y, config)
    settings, metrics = res.settings["hessian_trace"], res.metrics()
    assert settings["estimator"].startswith("exact GGN trace")
    assert settings["ggn_trace"] == pytest.approx(float(G.trace()), rel=1e-10)
    residual = float(H.trace() - G.trace())
    assert abs(settings["residual_trace"] - residual) <= 4 * metrics["hessian_trace_stderr"]
