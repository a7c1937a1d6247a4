"""compute_sharpness: the public API, its metrics and details, and the worst-case measures."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatcli.curvature.losses import get_loss
from flatcli.errors import UsageError
from flatcli.measures.sharpness import (
    ALL_MEASURES,
    SharpnessConfig,
    SharpnessResult,
    compute_sharpness,
)
from flatcli.measures.sharpness._worst_case import adaptive_sharpness, eps_sharpness, mean_loss
from tests.cases import make_case
from tests.references import dense_ggn, dense_hessian

EXACT = dict(diag_method="exact", batch_size=12, eps_steps=5, adaptive_steps=5)


def test_metrics_and_details_keys() -> None:
    model, x, y = make_case("cnn_bn")
    res = compute_sharpness(
        model,
        x,
        y,
        SharpnessConfig(
            diag_method="hutchinson",
            probes=20,
            probe_groups=2,
            trace_probes=10,
            eps_steps=3,
            adaptive_steps=3,
            batch_size=12,
        ),
    )
    m = res.metrics()
    assert set(m) == set(ALL_MEASURES) | {
        "normalized_sharpness_stderr",
        "normalized_sharpness_gap",
        "matrix_normalized_sharpness_stderr",
        "hessian_trace_stderr",
    }
    assert all(isinstance(v, float) for v in m.values())
    d = res.details()
    weights = ["0.weight", "5.weight"]
    assert list(d["per_layer"]["normalized_sharpness"]) == weights
    assert list(d["per_layer"]["matrix_normalized_sharpness"]) == weights
    assert sum(d["per_layer"]["normalized_sharpness"].values()) == pytest.approx(
        m["normalized_sharpness"]
    )
    assert d["excluded_params"] == ["0.bias", "1.weight", "1.bias", "5.bias"]
    assert d["settings"]["normalized_sharpness"]["loss"] == "nsce"
    assert d["settings"]["hessian_trace"]["loss"] == "ce"
    assert d["solver"]["0.weight"]["converged"]
    assert set(d["seconds"]) >= {"diagonal", "solver", "hessian_trace"}
    assert d["products"]["diagonal"] == 20
    assert model[1].training is False  # make_case gives eval mode, and it stays so


def test_default_is_the_exact_ggn_diagonal() -> None:
    model, x, y = make_case("mlp_relu")
    cfg = SharpnessConfig(measures=("normalized_sharpness",), batch_size=12)
    assert cfg.diag_method == "ggn"
    res = compute_sharpness(model, x, y, cfg)
    assert "normalized_sharpness_stderr" not in res.metrics()
    assert res.details()["products"]["diagonal"] == 0


def test_model_mode_is_restored() -> None:
    model, x, y = make_case("cnn_bn")
    model.train()
    compute_sharpness(model, x, y, SharpnessConfig(measures=("eps_sharpness",), eps_steps=1))
    assert all(m.training for m in model.modules())


def test_ggn_equals_exact_for_relu_mlp() -> None:
    """A ReLU network is multilinear in each weight: its Hessian and GGN diagonals agree."""
    model, x, y = make_case("mlp_relu")
    cfg = dict(measures=("normalized_sharpness", "matrix_normalized_sharpness"), batch_size=12)
    exact = compute_sharpness(model, x, y, SharpnessConfig(diag_method="exact", **cfg)).metrics()
    ggn = compute_sharpness(model, x, y, SharpnessConfig(diag_method="ggn", **cfg)).metrics()
    for k in ("normalized_sharpness", "matrix_normalized_sharpness"):
        assert ggn[k] == pytest.approx(exact[k], rel=1e-9)


def test_hutchinson_agrees_with_exact_within_stderr() -> None:
    model, x, y = make_case("mlp_tanh")
    cfg = dict(measures=("normalized_sharpness", "matrix_normalized_sharpness"), batch_size=12)
    exact = compute_sharpness(model, x, y, SharpnessConfig(diag_method="exact", **cfg)).metrics()
    est = compute_sharpness(
        model,
        x,
        y,
        SharpnessConfig(diag_method="hutchinson", probes=1000, trace_probes=300, seed=1, **cfg),
    ).metrics()
    for k in ("normalized_sharpness", "matrix_normalized_sharpness"):
        # clipping noisy entries biases normalized sharpness; allow the bias on top of 4 stderr
        assert abs(est[k] - exact[k]) <= 4 * est[f"{k}_stderr"] + 0.05 * exact[k], k


def test_same_seed_same_numbers() -> None:
    model, x, y = make_case("mlp_tanh")
    cfg = SharpnessConfig(
        measures=("normalized_sharpness", "hessian_trace"),
        diag_method="hutchinson",
        probes=20,
        probe_groups=2,
        trace_probes=10,
        batch_size=12,
        seed=5,
    )
    assert (
        compute_sharpness(model, x, y, cfg).metrics()
        == compute_sharpness(model, x, y, cfg).metrics()
    )


def test_float32_model() -> None:
    model, x, y = make_case("mlp_relu")
    model, x = model.float(), x.float()
    res = compute_sharpness(model, x, y, SharpnessConfig(**EXACT))
    ref = compute_sharpness(*make_case("mlp_relu"), SharpnessConfig(**EXACT))
    assert res.metrics()["normalized_sharpness"] == pytest.approx(
        ref.metrics()["normalized_sharpness"], rel=1e-4
    )


def test_exact_trace_matches_hutchinson() -> None:
    model, x, y = make_case("mlp_tanh")
    exact = compute_sharpness(
        model, x, y, SharpnessConfig(measures=("hessian_trace",), **EXACT)
    ).metrics()
    assert "hessian_trace_stderr" not in exact
    est = compute_sharpness(
        model, x, y, SharpnessConfig(measures=("hessian_trace",), trace_probes=400, batch_size=12)
    ).metrics()
    assert abs(est["hessian_trace"] - exact["hessian_trace"]) <= 4 * est["hessian_trace_stderr"]


@pytest.mark.parametrize("name", ["mlp_tanh", "mlp_relu"])
def test_ggn_residual_trace_against_dense_hessian_and_ggn(name: str) -> None:
    """tr H = tr G (exact) + Hutchinson on H − G: the GGN part to 1e-10, the residual within
    its standard error, and for a ReLU net (piecewise linear in each weight: diag(H − G) = 0)
    the GGN trace is already the Hessian trace."""
    model, x, y = make_case(name)
    H = dense_hessian(model, x, y, loss_fn=get_loss("ce"))
    G = dense_ggn(model, x, y, loss_fn=get_loss("ce"))
    res = compute_sharpness(
        model, x, y, SharpnessConfig(measures=("hessian_trace",), trace_probes=800, batch_size=12)
    )
    settings, metrics = res.settings["hessian_trace"], res.metrics()
    assert settings["estimator"].startswith("exact GGN trace")
    assert settings["ggn_trace"] == pytest.approx(float(G.trace()), rel=1e-10)
    residual = float(H.trace() - G.trace())
    assert abs(settings["residual_trace"] - residual) <= 4 * metrics["hessian_trace_stderr"]
    total = settings["ggn_trace"] + settings["residual_trace"]
    assert metrics["hessian_trace"] == pytest.approx(total)
    if name == "mlp_relu":
        assert float(G.trace()) == pytest.approx(float(H.trace()), rel=1e-10)
    else:
        assert abs(residual) > 6 * metrics["hessian_trace_stderr"]  # leaving it out fails
    # the control variate has less variance than Hutchinson on H with the same probes
    plain = compute_sharpness(
        model,
        x,
        y,
        SharpnessConfig(
            measures=("hessian_trace",), trace_method="hutchinson", trace_probes=200, batch_size=12
        ),
    ).metrics()
    assert metrics["hessian_trace_stderr"] < plain["hessian_trace_stderr"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"measures": ("sharpest",)}, "Unknown measure"),
        ({"measures": ()}, "at least one"),
        ({"loss": "hinge"}, "Unknown loss"),
        ({"diag_method": "kfac"}, "Unknown diag method"),
        ({"probes": 1}, "probes"),
        ({"adaptive_p": "1"}, "adaptive_p"),
        ({"head_dtype": "float16"}, "head dtype"),
        ({"lam": 0}, "lam"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        SharpnessConfig(**kwargs)


def test_config_round_trip() -> None:
    cfg = SharpnessConfig(measures="hessian_trace", adaptive_p="L2")
    assert cfg.measures == ("hessian_trace",) and cfg.adaptive_p == "2"
    assert cfg.to_dict()["measures"] == ["hessian_trace"]


def test_non_finite_metrics_become_none() -> None:
    res = SharpnessResult({"hessian_trace": 1.0}, {"hessian_trace": math.nan})
    assert res.metrics() == {"hessian_trace": 1.0, "hessian_trace_stderr": None}
    assert "hessian_trace_stderr" in res.details()["non_finite"]


# --------------------------------------------------------------------------- worst case


def test_eps_sharpness_properties() -> None:
    model, x, y = make_case("mlp_tanh")
    zero = eps_sharpness(model, x, y, steps=0)
    assert zero.value == 0.0 and zero.gradient_evals == 1
    small = eps_sharpness(model, x, y, eps=1e-4, steps=10)
    big = eps_sharpness(model, x, y, eps=1e-2, steps=10)
    assert 0 < small.value < big.value
    assert big.value == pytest.approx(100 * (big.max_loss - big.base_loss) / (1 + big.base_loss))
    assert max(big.history) == big.max_loss and big.history[0] == big.base_loss


def test_adaptive_sharpness_ball_and_scale_invariance() -> None:
    model, x, y = make_case("mlp_relu")
    inf = adaptive_sharpness(model, x, y, rho=1e-2, steps=8)
    two = adaptive_sharpness(model, x, y, p=2, steps=8)
    assert inf.value > 0 and two.value > 0 and two.settings["rho"] == 0.1
    # scaling a ReLU net's layers by α and 1/α (function unchanged) does not move it
    other = make_case("mlp_relu")[0]
    with torch.no_grad():
        other[1].weight.mul_(4.0), other[1].bias.mul_(4.0), other[3].weight.mul_(0.25)
    again = adaptive_sharpness(other, x, y, rho=1e-2, steps=8)
    assert again.value == pytest.approx(inf.value, rel=1e-9)
    with pytest.raises(UsageError):
        adaptive_sharpness(model, x, y, p=3)


def test_mean_loss_chunking() -> None:
    from flatcli.curvature._functional import FunctionalModel, head_loss
    from flatcli.curvature.losses import cross_entropy

    model, x, y = make_case("cnn")
    fm = FunctionalModel(model, [n for n, _ in model.named_parameters()])
    loss = head_loss(cross_entropy, None)
    v1, g1 = mean_loss(fm, fm.params, x, y, loss, 12)
    v2, g2 = mean_loss(fm, fm.params, x, y, loss, 5)
    assert v1 == pytest.approx(v2, rel=1e-12)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k])
    with torch.no_grad():
        assert v1 == pytest.approx(float(nn.functional.cross_entropy(model(x), y)), rel=1e-12)
