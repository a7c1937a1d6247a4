"""γ̂ (Jia & Su 2020, Eq. 5) and its baselines against dense float64 definitions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

from flatcli.curvature.losses import cross_entropy
from flatcli.errors import UsageError
from flatcli.measures.gamma import (
    GammaConfig,
    compute_gamma,
    draw_samples,
    input_jacobian_sq_norms,
    scaled_logits,
)
from tests.cases import make_case
from tests.references import (
    confident_mlp,
    dense_jacobian,
    exact_gradients,
    exact_softmax_input_jacobian,
    trained_confident_mlp,
)

F64 = torch.float64


def _dense(model, x, y, loss_fn=cross_entropy):
    J = dense_jacobian(model, x, y, loss_fn)
    return J @ J.T


@pytest.mark.parametrize("name", ("mlp_tanh", "cnn", "cnn_bn"))
def test_all_examples_one_trial_is_the_dense_log_determinant(name):
    model, x, y = make_case(name, n=12)
    config = GammaConfig(samples=12, trials=1, baselines=True, robustness_tol=1e-7)
    r = compute_gamma(model, x, y, config)
    xi = _dense(model, x, y)
    m = r.metrics()
    W = sum(p.numel() for p in model.parameters())
    assert m["num_params"] == W and m["samples"] == 12 and m["trials"] == 1
    assert math.isclose(m["gamma_hat"], torch.logdet(xi).item(), rel_tol=1e-10, abs_tol=1e-10)
    assert math.isclose(m["gamma_scaled"], W / 12 * m["gamma_hat"] - W * math.log(W), rel_tol=1e-12)
    assert m["gamma_hat_std"] is None
    assert math.isclose(m["fisher_trace"], xi.trace().item() / 12, rel_tol=1e-12)
    assert math.isclose(m["spectral_radius"], torch.linalg.eigvalsh(xi)[-1].item(), rel_tol=1e-12)
    assert math.isclose(m["fisher_frobenius_sq"], (xi**2).sum().item() / 144, rel_tol=1e-12)
    J = dense_jacobian(model, x, y)  # the paper's diagonal-terms variant: (1/N') Σ ‖g_n‖⁴
    want = torch.linalg.vector_norm(J, dim=1).pow(4).mean().item()
    assert math.isclose(m["fisher_frobenius_sq_diag"], want, rel_tol=1e-12)
    # robustness: mean over examples of the squared spectral norm of d softmax / dx
    jac = vmap(jacrev(lambda xn: torch.softmax(model(xn.unsqueeze(0))[0], -1)))(x)
    jac = jac.reshape(12, jac.shape[1], -1)
    expected = torch.linalg.matrix_norm(jac, ord=2).pow(2).mean().item()
    assert math.isclose(m["robustness"], expected, rel_tol=1e-8)
    assert r.details()["robustness"]["unconverged"] == 0
    json.dumps({"metrics": m, "details": r.details()})  # JSON-ready


def test_trials_are_the_drawn_samples():
    model, x, y = make_case("mlp_tanh", n=12)
    config = GammaConfig(samples=5, trials=3, seed=7)
    r = compute_gamma(model, x, y, config)
    index = draw_samples(12, 5, 3, seed=7)
    assert all(len(set(row.tolist())) == 5 for row in index)  # without replacement
    logdets = []
    for row in index:
        logdets.append(torch.logdet(_dense(model, x[row], y[row])).item())
    per_trial = r.details()["per_trial"]["logdet"]
    for got, want in zip(per_trial, logdets, strict=True):
        assert math.isclose(got, want, rel_tol=1e-10)
    m = r.metrics()
    assert math.isclose(m["gamma_hat"], sum(logdets) / 3, rel_tol=1e-10)
    assert math.isclose(
        m["gamma_hat_std"], torch.tensor(logdets, dtype=F64).std().item(), rel_tol=1e-8
    )
    assert len(r.details()["per_trial"]["rank"]) == 3


def test_seeded_runs_are_bit_identical_and_chunking_is_round_off():
    model, x, y = make_case("cnn_bn", n=12)
    a = compute_gamma(model, x, y, GammaConfig(samples=6, trials=4, seed=3, baselines=True))
    b = compute_gamma(model, x, y, GammaConfig(samples=6, trials=4, seed=3, baselines=True))
    assert a.metrics() == b.metrics() and a.details() == b.details()
    c = compute_gamma(model, x, y, GammaConfig(samples=6, trials=4, seed=4))
    assert c.metrics()["gamma_hat"] != a.metrics()["gamma_hat"]
    for batch, method in ((1, "auto"), (7, "ghost"), (5, "materialize")):
        d = compute_gamma(
            model, x, y, GammaConfig(samples=6, trials=4, seed=3, batch_size=batch, method=method)
        )
        for key in ("gamma_hat", "gamma_hat_std", "fisher_trace", "spectral_radius"):
            assert math.isclose(d.metrics()[key], a.metrics()[key], rel_tol=1e-11), key


def test_more_samples_than_parameters_is_singular_not_clipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 3)).double()  # W = 15
    x = torch.randn(20, 2, dtype=F64)
    y = torch.randint(0, 3, (20,))
    r = compute_gamma(model, x, y, GammaConfig(samples=16, trials=2))
    m, d = r.metrics(), r.details()
    assert m["gamma_hat"] is None and m["gamma_scaled"] is None and m["gamma_hat_std"] is None
    assert "exceed W = 15" in d["reason"] and d["singular_trials"] == 2
    assert all(rank <= 15 for rank in d["per_trial"]["rank"])
    assert d["per_trial"]["logdet"] == [None, None]
    assert m["fisher_trace"] > 0  # the baselines are still reported


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_duplicated_example_is_singular(dtype):
    model, x, y = make_case("cnn", n=8)
    x[5], y[5] = x[2], y[2]
    model, x = model.to(dtype), x.to(dtype)
    r = compute_gamma(model, x, y, GammaConfig(samples=8, trials=1))
    assert r.metrics()["gamma_hat"] is None
    d = r.details()
    assert d["per_trial"]["rank"] == [7] and "singular" in d["reason"]
    assert d["nonfinite"]["gamma_hat"] == d["reason"]


def _confident_mlp():
    """A 6-32-3 tanh MLP whose correct outputs are so confident that 1 - p(y|x) < 2⁻²⁴ for some."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    x = torch.randn(24, 6, generator=g, dtype=F64)
    with torch.no_grad():
        model[2].weight.mul_(100.0)
        z = model(x)
    y = z.argmax(dim=1)
    one_minus_p = -torch.expm1(-cross_entropy(z, y))
    assert (one_minus_p < 2**-24).sum() >= 3
    return model, x, y


def test_float32_network_matches_float64_within_1e_3():
    model, x, y = _confident_mlp()
    config = GammaConfig(samples=12, trials=5)
    g64 = compute_gamma(model, x, y, config).metrics()["gamma_hat"]
    m32 = model.float()
    g32 = compute_gamma(m32, x.float(), y, config).metrics()["gamma_hat"]
    assert abs(g32 - g64) < 1e-3, (g32, g64)
    bad = compute_gamma(m32, x.float(), y, GammaConfig(samples=12, trials=5, head_dtype="float32"))
    bad_value = bad.metrics()["gamma_hat"]
    assert bad_value is None or abs(bad_value - g64) > 1e-2  # what the float64 head prevents


def test_logit_scale_and_bn_train_mode_against_dense():
    model, x, y = make_case("cnn_bn", n=10)
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def head(z, labels):
        return cross_entropy(scaled_logits(z, 25.0), labels)

    r = compute_gamma(model, x, y, GammaConfig(samples=10, trials=1, logit_scale=25.0))
    assert math.isclose(
        r.metrics()["gamma_hat"], torch.logdet(_dense(model, x, y, head)).item(), rel_tol=1e-10
    )
    r = compute_gamma(model, x, y, GammaConfig(samples=10, trials=1, bn_mode="train"))
    model.train()  # the dense reference with batch statistics of the sample
    want = torch.logdet(_dense(model, x, y)).item()
    model.eval()
    assert math.isclose(r.metrics()["gamma_hat"], want, rel_tol=1e-10)
    assert r.details()["engine"]["method"] == "materialize"
    assert [m.training for m in model.modules()] == modes
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k])


def test_model_modes_are_restored():
    model, x, y = make_case("cnn_bn", n=8)
    model.train()
    compute_gamma(model, x, y, GammaConfig(samples=4, trials=1, baselines=True))
    assert all(m.training for m in model.modules())


def test_robustness_power_iteration_stops_at_its_tolerance():
    model, x, _ = make_case("cnn", n=6)
    values, info = input_jacobian_sq_norms(model, x, tol=1e-3, max_iter=500)
    jac = vmap(jacrev(lambda xn: torch.softmax(model(xn.unsqueeze(0))[0], -1)))(x)
    exact = torch.linalg.matrix_norm(jac.reshape(6, 3, -1), ord=2).pow(2)
    assert info["unconverged"] == 0 and info["max_relative_residual"] <= 1e-3
    assert ((values - exact).abs() / exact).max() < 1e-3
    _, capped = input_jacobian_sq_norms(model, x, tol=1e-15, max_iter=2)
    assert capped["iterations"] == 2 and capped["unconverged"] > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"samples": 0}, "samples"),
        ({"trials": 0}, "trials"),
        ({"bn_mode": "batch"}, "bn_mode"),
        ({"method": "fast"}, "method"),
        ({"logit_scale": -1.0}, "logit_scale"),
        ({"head_dtype": "float16"}, "head dtype"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(UsageError, match=match):
        GammaConfig(**kwargs)


def test_more_samples_than_examples():
    model, x, y = make_case("mlp_tanh", n=5)
    with pytest.raises(UsageError, match="exceeds the 5 examples"):
        compute_gamma(model, x, y, GammaConfig(samples=6, trials=1))


def test_frobenius_variants_over_several_trials():
    """Per trial t: exact ‖ξ_t‖_F²/N'² and the paper's (1/N') Σ_n ‖g_n g_nᵀ‖_F², averaged over t.

    The two differ by the off-diagonal terms (g_n·g_m)², n ≠ m, and by a factor N'."""
    model, x, y = make_case("mlp_tanh", n=12)
    r = compute_gamma(model, x, y, GammaConfig(samples=5, trials=4, seed=3))
    J = dense_jacobian(model, x, y)
    index = draw_samples(12, 5, 4, 3)
    exact, paper = [], []
    for rows in index:
        Jt = J[rows]
        g = Jt.unsqueeze(2) * Jt.unsqueeze(1)  # (N', W, W): g_n g_nᵀ
        exact.append(float(torch.linalg.matrix_norm(Jt.T @ Jt / 5) ** 2))
        paper.append(float((g**2).sum(dim=(1, 2)).mean()))
    m = r.metrics()
    assert math.isclose(m["fisher_frobenius_sq"], sum(exact) / 4, rel_tol=1e-12)
    assert math.isclose(m["fisher_frobenius_sq_diag"], sum(paper) / 4, rel_tol=1e-12)
    assert not math.isclose(m["fisher_frobenius_sq"], m["fisher_frobenius_sq_diag"], rel_tol=0.1)


@pytest.mark.parametrize("case", ["margin40", "margin45", "trained"])
def test_robustness_is_exact_on_confident_nets(case):
    """Per example, |v - v_ref| / v_ref <= 1e-10 with v_ref = ‖Λ_ref ∂z/∂x‖₂² from the mpmath head.

    Autograd through torch.softmax (flatcli 0.1.0) loses Λ's label entry p_y(1 - p_y) there."""
    model, x, _ = trained_confident_mlp() if case == "trained" else confident_mlp(float(case[6:]))
    ref = torch.linalg.matrix_norm(exact_softmax_input_jacobian(model, x), ord=2).pow(2)
    values, info = input_jacobian_sq_norms(model, x, tol=1e-9, max_iter=5000)
    assert info["unconverged"] == 0
    assert float(((values - ref).abs() / ref).max()) <= 1e-10
    old = vmap(jacrev(lambda xn: torch.softmax(model(xn.unsqueeze(0))[0], -1)))(x)
    old_values = torch.linalg.matrix_norm(old.detach(), ord=2).pow(2)
    assert float(((old_values - ref).abs() / ref).max()) > 1e-10  # what 0.1.0 computed
    r = compute_gamma(
        model,
        x,
        _,
        GammaConfig(
            samples=4, trials=1, baselines=True, robustness_tol=1e-9, robustness_max_iter=5000
        ),
    )
    assert math.isclose(r.metrics()["robustness"], float(ref.mean()), rel_tol=1e-10)


def test_gamma_on_the_confident_trained_net_matches_the_exact_reference():
    """γ̂ over a few trials equals the mean of ln|G_t G_tᵀ| with G from the mpmath head."""
    model, x, y = trained_confident_mlp()
    r = compute_gamma(model, x, y, GammaConfig(samples=6, trials=3, seed=1))
    G = exact_gradients(model, x, y)
    want = sum(float(torch.logdet(G[t] @ G[t].T)) for t in draw_samples(12, 6, 3, 1)) / 3
    assert math.isclose(r.metrics()["gamma_hat"], want, rel_tol=1e-10)
