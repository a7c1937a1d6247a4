"""``hessian_trace --trace-method auto`` (the default): the exact GGN trace plus Hutchinson on
H − G where that is the cheaper for the same standard error, Hutchinson on H where the GGN
diagonal's outputs make it dear (a language model's T·V token logits, issue #23); and the cost
said up front counts the GGN diagonal whenever the trace pays for it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor
from torch.func import hessian
from torch.nn import functional as F

from flatcli.measures.sharpness import SharpnessConfig, compute_sharpness
from flatcli.measures.sharpness import _cost as sharpness_cost
from flatcli.measures.sharpness.hessian_trace import resolve_trace_method
from tests.cases import TiedLM, make_case
from tests.references import flat_logits

V, T = 64, 80


def _config(**kw: object) -> SharpnessConfig:
    return SharpnessConfig(measures=("hessian_trace",), **kw).resolved("ce")


@pytest.mark.parametrize(
    ("outputs", "probes", "expected"),
    [
        (10, 10, "ggn-residual"),  # LeNet-5 on digits: 15 + 45 passes <= 5.5 x 25
        (61, 10, "ggn-residual"),  # the largest K that still pays at 10 probes
        (62, 10, "hutchinson"),
        (100, 100, "ggn-residual"),  # more probes pay the fixed GGN diagonal back
        (64 * 256, 10, "hutchinson"),  # gpt-tiny scored as if its logits were classes
    ],
)
def test_auto_takes_the_cheaper_method_for_the_same_stderr(
    outputs: int, probes: int, expected: str
) -> None:
    method, why = resolve_trace_method(_config(trace_probes=probes), outputs)
    assert method == expected
    assert (why is None) == (expected == "ggn-residual")
    if why is not None:
        assert f"{outputs:,} outputs per example" in why


def test_a_chosen_method_is_kept_and_a_shared_ggn_diagonal_makes_the_residual_free() -> None:
    for method in ("ggn-residual", "hutchinson", "hutchpp"):
        assert resolve_trace_method(_config(trace_method=method), 10**6) == (method, None)
    # normalized sharpness computes the GGN diagonal of mse anyway: its sum is the GGN trace
    both = ("hessian_trace", "normalized_sharpness")
    shared = SharpnessConfig(measures=both, loss="mse").resolved("mse")
    assert resolve_trace_method(shared, 10**6)[0] == "ggn-residual"
    alone = SharpnessConfig(measures=("hessian_trace",), loss="mse").resolved("mse")
    assert resolve_trace_method(alone, 10**6)[0] == "hutchinson"


def test_a_language_model_gets_hutchinson_by_default_and_the_dense_trace() -> None:
    """T·V = 5,120 token logits per sequence: ggn-residual would cost about 2,948 gradient
    passes (0.4 per token logit, then 200 probes) against 2,750 for Hutchinson at the same
    error, so auto takes Hutchinson, which matches the dense float64 trace of H within 4
    standard errors (and says why in the settings)."""
    torch.manual_seed(0)
    model = TiedLM(V, 3).double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (3, T), generator=g)
    y = torch.randint(0, V, (3, T), generator=g)
    y[0, :7] = -100
    theta, logits = flat_logits(model, x)

    def loss(t: Tensor) -> Tensor:
        return F.cross_entropy(logits(t).reshape(-1, V), y.reshape(-1), ignore_index=-100)

    exact = float(hessian(loss)(theta).trace())
    res = compute_sharpness(
        model, x, y, SharpnessConfig(measures=("hessian_trace",), loss="token-ce", trace_probes=200)
    )
    settings, metrics = res.settings["hessian_trace"], res.metrics()
    assert settings["trace_method"] == "hutchinson"
    assert "5,120 outputs per example" in settings["trace_method_reason"]
    assert "ggn_trace" not in settings
    assert abs(metrics["hessian_trace"] - exact) <= 4 * metrics["hessian_trace_stderr"]
    assert metrics["hessian_trace_stderr"] < 0.2 * abs(exact)  # a test that can fail


def test_the_cost_said_up_front_counts_the_ggn_diagonal_the_trace_computes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``hessian_trace`` alone nothing else computes the GGN diagonal of its loss, so the
    estimate counts it (1.5 passes per output) whatever the normalized measures would share."""
    monkeypatch.setattr(sharpness_cost, "_pass_seconds", lambda *a: 1.0)
    model, x, _ = make_case("mlp_tanh", n=8)
    y = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    config = SharpnessConfig(measures=("hessian_trace",), loss="mse", trace_method="ggn-residual")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = compute_sharpness(model, x, y, config)
    assert res.info["estimated_seconds"] == pytest.approx(1.5 * 3 + 10 * 4.5)
    assert res.settings["hessian_trace"]["trace_method"] == "ggn-residual"


def test_a_cost_line_dominated_by_the_ggn_diagonal_names_the_hutchinson_diagonal_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A language model's normalized measures spend most passes on the exact GGN diagonal
    (T·V token rows): the warning names the option that removes them before the others."""
    monkeypatch.setattr(sharpness_cost, "_pass_seconds", lambda *a: 1.0)
    model, x, y = make_case("mlp_tanh", n=4)
    config = SharpnessConfig()
    with pytest.warns(UserWarning, match=r"≈ .*; --diag-method hutchinson \(the exact GGN "):
        sharpness_cost.warn_cost(model, x, y, config, [45.0, 6554.0], 16384, diagonal=6554.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharpness_cost.warn_cost(model, x, y, config, [45.0, 90.0], 10, diagonal=15.0)
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "--diag-method" not in said[0]
