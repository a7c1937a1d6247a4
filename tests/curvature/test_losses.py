"""Loss heads at their edges: NSCE with collapsed logits, cross-entropy far beyond 1e-16."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, hessian

from flatcli.curvature.losses import (
    NSCE_MIN_RELATIVE_STD,
    cross_entropy,
    normalized_cross_entropy,
    normalized_logits,
)

F64 = torch.float64
Y = torch.tensor([1])


def _derivatives(z: list[float], dtype=F64) -> tuple[float, float, float]:
    """(NSCE - ln K, ‖∇‖₂, max |Hessian entry|) at logits ``z`` for label 1."""
    t = torch.tensor([z], dtype=dtype)

    def f(u):
        return normalized_cross_entropy(u, Y).sum()

    return (
        float(f(t)) - math.log(len(z)),
        float(grad(f)(t).norm()),
        float(hessian(f)(t).abs().max()),
    )


@pytest.mark.parametrize("c", [0.0, 2.5, -1e3, 1e30])
def test_nsce_with_zero_spread_is_uniform_and_finite(c):
    """All logits equal: the softmax is uniform (loss ln K); derivatives finite, never NaN."""
    for dtype in (F64, torch.float32):
        loss, g, h = _derivatives([c, c, c], dtype)
        assert abs(loss) < 1e-6 and math.isfinite(g) and math.isfinite(h)
        if c == 0.0:  # exactly zero logits: normalized logits 0, zero gradient (defined so)
            assert g == 0.0 and h == 0.0
        else:  # the floor bounds the gradient by about sqrt(2) / (floor * scale)
            assert g <= 1.5 / (NSCE_MIN_RELATIVE_STD * abs(c))


def test_nsce_spread_below_the_floor_is_bounded():
    """A spread of 1e-13 on logits of scale 1 (0.1.0: gradient norm 7e10, growing as 1/spread)."""
    for spread in (1e-13, 1e-10, 1e-15):
        loss, g, h = _derivatives([1.0, 1.0 + spread, 1.0])
        assert abs(loss) < spread / NSCE_MIN_RELATIVE_STD  # near-uniform softmax
        assert g <= 1.5 / NSCE_MIN_RELATIVE_STD and h <= 2 / NSCE_MIN_RELATIVE_STD**2
    # the unfloored Eq. 22 divides by the spread itself
    z = torch.tensor([[1.0, 1.0 + 1e-13, 1.0]], dtype=F64)
    std = z.std(dim=1, correction=0, keepdim=True)

    def raw(u):
        return cross_entropy(u / std, Y).sum()

    assert float(grad(raw)(z).norm()) > 1e9


def test_nsce_above_the_floor_is_eq_22_exactly():
    """Ordinary logits (spread >> 1e-6 of their scale): the floor changes nothing, bit for bit."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 5, generator=g, dtype=F64) * torch.logspace(-8, 8, 32, dtype=F64)[:, None]
    z = z + 3.0 * torch.randn(32, 1, generator=g, dtype=F64) * z.abs().amax(1, keepdim=True)
    std = ((z - z.mean(dim=1, keepdim=True)) ** 2).mean(dim=1, keepdim=True).sqrt()
    assert bool((std > NSCE_MIN_RELATIVE_STD * z.abs().amax(1, keepdim=True)).all())
    assert torch.equal(normalized_logits(z), z / std)
    # at the floor's edge the loss is continuous
    a = torch.tensor([[1.0, 1.0 + 2.5e-6, 1.0]], dtype=F64)
    b = torch.tensor([[1.0, 1.0 + 2.4e-6, 1.0]], dtype=F64)
    assert abs(float(normalized_cross_entropy(a, Y) - normalized_cross_entropy(b, Y))) < 0.05


def test_cross_entropy_label_gradient_beyond_float64():
    """Margin 800: 1 - p_y = 2e-348 underflows; the label entry of the gradient is then -0,
    not NaN, and the loss is 0 without overflow in the other branch of softplus."""
    z = torch.tensor([[800.0, 0.0, 0.0], [0.0, 800.0, 0.0]], dtype=F64, requires_grad=True)
    y = torch.tensor([0, 0])
    loss = cross_entropy(z, y)
    (g,) = torch.autograd.grad(loss.sum(), z)
    assert loss.tolist() == [0.0, 800.0]
    assert torch.isfinite(g).all() and float(g[1, 0]) == -1.0 and float(g[1, 1]) == 1.0
