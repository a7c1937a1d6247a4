"""``method="exact"``: the cost is said up front, progress per block, a refusal unless forced."""

from __future__ import annotations

import math

import pytest
import torch

import flatcli.curvature.diagonal as diagonal
from flatcli.curvature.diagonal import curvature_diagonal, exact_diagonal, format_seconds
from flatcli.curvature.operators import make_operator
from flatcli.errors import UsageError
from tests.cases import make_case


def test_progress_says_the_estimate_first_then_every_block() -> None:
    model, x, y = make_case("mlp_tanh")
    op = make_operator("hessian", model, x, y)
    calls = []
    diag = exact_diagonal(op, block=16, progress=lambda d, done, total: calls.append((d, done)))
    dim = op.dim
    assert calls[0][1] == 2  # the two timed single products come first
    assert calls[0][0].startswith(f"exact diagonal: {dim:,} products (one per parameter), about")
    assert [done for _, done in calls] == [2, *range(18, dim, 16), dim]
    assert len({d for d, _ in calls}) == 1  # one description: the estimate stays as said
    assert len(calls) == 1 + math.ceil((dim - 2) / 16)
    dense = op.to_dense()
    assert torch.allclose(diag, torch.diagonal(dense), rtol=1e-12, atol=1e-14)


def test_refused_above_the_time_limit_unless_forced(monkeypatch) -> None:
    model, x, y = make_case("mlp_tanh")
    monkeypatch.setattr(diagonal, "EXACT_MAX_SECONDS", 0.0)
    with pytest.raises(UsageError, match="--force") as err:
        curvature_diagonal(model, x, y, method="exact", loss_fn="ce")
    assert "products" in str(err.value) and "'ggn'" in str(err.value)
    forced = curvature_diagonal(model, x, y, method="exact", loss_fn="ce", force=True)
    monkeypatch.setattr(diagonal, "EXACT_MAX_SECONDS", 3600.0)
    normal = curvature_diagonal(model, x, y, method="exact", loss_fn="ce")
    for k in normal.values:
        assert torch.allclose(forced.values[k], normal.values[k], rtol=1e-12, atol=1e-15)
    assert normal.estimated_seconds is not None and normal.estimated_seconds > 0
    assert normal.describe()["estimated_seconds"] == normal.estimated_seconds
    assert normal.products == sum(v.numel() for v in normal.values.values())


def test_refusal_happens_after_one_timed_product(monkeypatch) -> None:
    model, x, y = make_case("mlp_tanh")
    op = make_operator("hessian", model, x, y)
    with pytest.raises(UsageError, match="--force"):
        exact_diagonal(op, max_seconds=0.0)
    assert op.matvecs == 2  # e_0 and e_1 timed, nothing more


def test_shared_operator_counts_only_its_own_products() -> None:
    model, x, y = make_case("mlp_tanh")
    op = make_operator("hessian", model, x, y, loss_fn="ce")
    op.matvec(torch.randn(op.dim, dtype=torch.float64))
    d = curvature_diagonal(model, x, y, method="exact", operator=op, params=["3.weight"])
    assert d.products == model[3].weight.numel()
    assert d.matrix == "hessian" and set(d.values) == {"3.weight"}


def test_format_seconds() -> None:
    assert format_seconds(0.0123) == "0.012 s"
    assert format_seconds(42) == "42 s"
    assert format_seconds(600) == "10.0 min"
    assert format_seconds(3 * 3600) == "3.0 h"
