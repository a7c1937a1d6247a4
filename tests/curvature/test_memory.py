"""The memory model and the automatic chunk size."""

from __future__ import annotations

import torch
from torch import nn

from flatcli.curvature.memory import (
    activation_bytes_per_example,
    auto_batch_size,
    available_memory,
    estimate_memory,
)
from flatcli.curvature.operators import make_operator
from tests.cases import make_case


def test_activation_bytes_scale_with_width():
    small = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    wide = nn.Sequential(nn.Linear(10, 2000), nn.Tanh(), nn.Linear(2000, 3))
    a, b = activation_bytes_per_example(small, (10,)), activation_bytes_per_example(wide, (10,))
    assert 0 < a < b
    assert b >= 2000 * 4  # at least the hidden activation in float32


def test_estimate_grows_with_batch_and_dtype():
    model, _, _ = make_case("cnn_bn")
    m1 = estimate_memory(model, (2, 4, 4), 3, 1, torch.float64)
    m100 = estimate_memory(model, (2, 4, 4), 3, 100, torch.float64)
    m100_32 = estimate_memory(model, (2, 4, 4), 3, 100, torch.float32)
    assert 0 < m1 < m100 and m100_32 < m100
    params = sum(p.numel() for p in model.parameters()) * 8
    assert m1 >= params


def test_auto_batch_size_respects_budget():
    model, x, _ = make_case("cnn", n=1000)
    assert auto_batch_size(model, x, budget_bytes=10**12) == 1000
    assert auto_batch_size(model, x, budget_bytes=1) == 1
    mid = auto_batch_size(model, x, budget_bytes=estimate_memory(model, (2, 4, 4), 3, 100))
    assert 90 <= mid <= 100
    assert available_memory("cpu") > 0


def test_model_mode_and_buffers_untouched():
    model, x, _ = make_case("cnn_bn")
    model.train()
    before = model[1].running_mean.clone()
    auto_batch_size(model, x)
    assert torch.equal(model[1].running_mean, before) and model.training


def test_make_operator_uses_auto_batch_size(monkeypatch):
    import flatcli.curvature.operators as ops

    model, x, y = make_case("mlp_tanh")
    monkeypatch.setattr(ops, "auto_batch_size", lambda *a, **k: 4)
    op = ops.make_operator("ggn", model, x, y)
    assert op.batch_size == 4
    ref = make_operator("ggn", model, x, y, batch_size=12)
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op.matvec(v), ref.matvec(v), rtol=1e-12, atol=1e-14)
    V = torch.randn(op.dim, 5, dtype=torch.float64)  # k columns shrink the auto chunk
    assert op._chunk_size(5) == 1
    assert torch.allclose(op.matmat(V), ref.matmat(V), rtol=1e-12, atol=1e-14)
