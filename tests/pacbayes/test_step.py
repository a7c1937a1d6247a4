"""The fused optimisation step against plain autograd of Eq. 46 (Wu et al. 2020), in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import flatcli.pacbayes.optimize as optimize_mod
from flatcli.errors import MeasureError
from flatcli.pacbayes.optimize import optimize_posterior, pacbayes_objective
from flatcli.pacbayes.posterior import Basis, LayerBasis
from flatcli.pacbayes.step import (
    FlatLayout,
    FlatState,
    Kernels,
    Workspace,
    activation_layers,
    objective_and_gradients,
    objective_from_terms,
    objective_terms,
)
from model_zoo.registry import get_model

F64 = torch.float64
KW = dict(num_train=500, delta=0.025, b=100.0, c=0.1)


def _orth(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return get_model("mlp", in_features=6, hidden=[8, 5], num_classes=3).double()


def _basis(model: nn.Module, keys: list[str]) -> Basis:
    params = dict(model.named_parameters())
    return Basis(
        {
            k: LayerBasis(
                _orth(params[k].shape[0], 2 * i),
                _orth(params[k].shape[1], 2 * i + 1),
                tuple(params[k].shape),
            )
            for i, k in enumerate(keys)
        }
    )


def _problem(model: nn.Module):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    w0 = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    log_std = {
        k: -2.0 + 0.4 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()
    }
    xi = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    return x, y, params, w0, log_std, xi


def _reference(model, basis, x, y, params, w0, log_std, xi, rho):
    """Autograd of Eq. 46 through w′ = w + ToStandard(ξ ⊙ exp(ς)), no shortcuts."""
    mean = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ls = {k: v.clone().requires_grad_(True) for k, v in log_std.items()}
    r = torch.tensor(rho, dtype=F64, requires_grad=True)
    noise = basis.to_standard({k: xi[k] * ls[k].exp() for k in xi})
    wp = {k: mean[k] + noise[k] for k in mean}
    ce = F.cross_entropy(functional_call(model, wp, (x,)), y)
    obj, kl, bre = pacbayes_objective(ce, mean, ls, r, w0, **KW)
    grads = torch.autograd.grad(obj, [*mean.values(), *ls.values(), r])
    n = len(mean)
    return (
        obj,
        kl,
        bre,
        dict(zip(mean, grads[:n], strict=True)),
        dict(zip(ls, grads[n : 2 * n], strict=True)),
        grads[-1],
    )


def _fused_step(model, basis, on_act, x, y, params, w0, log_std, xi, rho):
    """objective_and_gradients on the flat vectors of the problem: (layout, StepResult)."""
    layout = FlatLayout.of(params)
    res = objective_and_gradients(
        model,
        {},
        layout,
        layout.flatten(params),
        layout.flatten(log_std),
        torch.tensor(rho, dtype=F64),
        layout.flatten(w0),
        layout.flatten(xi),
        x,
        y,
        basis=basis,
        on_activations=frozenset(on_act),
        **KW,
    )
    return layout, res


@pytest.mark.parametrize(
    ("rotated", "on_act"),
    [
        ([], []),
        (["fc1.weight", "fc2.weight", "fc3.weight"], []),
        (["fc1.weight", "fc2.weight", "fc3.weight"], ["fc1.weight", "fc2.weight", "fc3.weight"]),
        (["fc1.weight", "fc3.weight"], ["fc3.weight"]),
    ],
    ids=["vanilla", "weights", "activations", "mixed"],
)
def test_fused_step_equals_autograd_of_eq_46(rotated, on_act):
    model = _net()
    basis = _basis(model, rotated)
    x, y, params, w0, log_std, xi = _problem(model)
    rho = -1.7
    obj, kl, bre, g_mean, g_ls, g_rho = _reference(model, basis, x, y, params, w0, log_std, xi, rho)
    layout, res = _fused_step(model, basis, on_act, x, y, params, w0, log_std, xi, rho)
    assert float(res.objective) == pytest.approx(float(obj.detach()), rel=1e-12)
    assert float(res.kl) == pytest.approx(float(kl.detach()), rel=1e-10)
    assert float(res.b_re) == pytest.approx(float(bre.detach()), rel=1e-10)
    for k, v in layout.views(res.grad_mean).items():
        torch.testing.assert_close(v, g_mean[k], rtol=1e-10, atol=1e-13)
    for k, v in layout.views(res.grad_log_std).items():
        torch.testing.assert_close(v, g_ls[k], rtol=1e-10, atol=1e-13)
    assert float(res.grad_rho) == pytest.approx(float(g_rho.detach()), rel=1e-10)
    for h in (m._forward_hooks for m in model.modules()):
        assert not h  # the activation-side hooks are gone


def test_a_wrong_noise_placement_is_caught():
    """The comparison above fails when the activation-side term uses Nᵀ in the wrong basis."""
    model = _net()
    basis = _basis(model, ["fc1.weight"])
    x, y, params, w0, log_std, xi = _problem(model)
    _, _, _, g_mean, _, _ = _reference(model, basis, x, y, params, w0, log_std, xi, -1.7)
    wrong = Basis(
        {
            "fc1.weight": LayerBasis(
                basis.layers["fc1.weight"].U.T, basis.layers["fc1.weight"].V, (8, 6)
            )
        }
    )
    layout, res = _fused_step(model, wrong, ["fc1.weight"], x, y, params, w0, log_std, xi, -1.7)
    diff = max(float((v - g_mean[k]).abs().max()) for k, v in layout.views(res.grad_mean).items())
    assert diff > 1e-6


def test_noise_goes_on_the_activations_only_when_cheaper():
    lin = nn.Sequential(nn.Linear(784, 600), nn.ReLU(), nn.Linear(600, 2))
    basis = Basis(
        {
            "0.weight": LayerBasis(torch.eye(600), torch.eye(784), (600, 784)),
            "2.weight": LayerBasis(torch.eye(2), torch.eye(600), (2, 600)),
        }
    )
    # 4mn(m + n) = 2.6e9 flops on the weights; 2B(2n² + 3nm + 2m²) = 6.7e6·B on activations
    assert activation_layers(lin, basis, 64) == {"0.weight"}
    assert activation_layers(lin, basis, 256) == {"0.weight"}
    assert activation_layers(lin, basis, 1024) == frozenset()


@pytest.mark.parametrize("placement", ["weights", "activations"])
@pytest.mark.parametrize("method", ["vanilla", "approx-hessian"])
def test_optimisation_loop_is_algorithm_1_with_rmsprop(monkeypatch, method, placement):
    """Three epochs of the loop against a plain autograd + torch.optim.RMSprop transcription."""
    model = _net()
    x, y, params, w0, _, _ = _problem(model)
    keys = ["fc1.weight", "fc2.weight", "fc3.weight"]
    basis = _basis(model, keys) if method != "vanilla" else Basis()
    if placement == "activations":
        monkeypatch.setattr(optimize_mod, "activation_layers", lambda *a: frozenset(keys))
    epochs, bs, lr, seed = 3, 16, 0.01, 4
    post, curve = optimize_posterior(
        model,
        x,
        y,
        w0,
        method=method,
        epochs=epochs,
        lr=lr,
        batch_size=bs,
        schedule="constant",
        seed=seed,
        basis_fn=(lambda mean: basis) if method != "vanilla" else None,
        **{k: v for k, v in KW.items() if k != "num_train"},
    )
    # the transcription
    mean = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    coords = basis.to_hessian(params)
    ls = {k: torch.log(coords[k].abs().clamp_min(1e-8)).requires_grad_(True) for k in params}
    rho = torch.tensor(-3.0, dtype=F64, requires_grad=True)
    opt = torch.optim.RMSprop([*mean.values(), *ls.values(), rho], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    layout = FlatLayout.of(params)
    m = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(m, generator=gen)
        for s in range(math.ceil(m / bs)):
            idx = perm[s * bs : (s + 1) * bs]
            xi = layout.views(torch.empty(layout.numel, dtype=F64).normal_(generator=gen))
            noise = basis.to_standard({k: xi[k] * ls[k].exp() for k in xi})
            wp = {k: mean[k] + noise[k] for k in mean}
            ce = F.cross_entropy(functional_call(model, wp, (x[idx],)), y[idx])
            obj, _, _ = pacbayes_objective(
                ce, mean, ls, rho, w0, num_train=m, delta=0.025, b=100.0, c=0.1
            )
            opt.zero_grad()
            obj.backward()
            opt.step()
    for k in params:
        torch.testing.assert_close(post.mean[k], mean[k].detach(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(post.log_std[k], ls[k].detach(), rtol=1e-9, atol=1e-11)
    assert post.rho == pytest.approx(float(rho.detach()), rel=1e-9)
    assert len(curve) == epochs


def test_the_prior_variance_stays_on_the_certifiable_grid():
    """λ is projected onto λ ≤ λ₁ = c·e^(−1/b): the certificate's grid has no j < 1."""
    model = _net()
    x, y, params, _, _, _ = _problem(model)
    w0 = {k: v + 0.5 for k, v in params.items()}  # far from the mean: the KL wants a large λ
    kw = dict(epochs=6, lr=0.05, batch_size=20, seed=0, b=100.0, delta=0.025)
    free, _ = optimize_posterior(model, x, y, w0, c=10.0, **kw)
    lam_1 = 1e-2 * math.exp(-1.0 / 100.0)
    assert free.prior_variance > 1.5 * lam_1  # unconstrained, it would leave the grid
    post, curve = optimize_posterior(model, x, y, w0, c=1e-2, **kw)
    assert post.prior_variance == pytest.approx(lam_1, rel=1e-5)  # the constraint binds
    assert all(row["prior_variance"] <= lam_1 * (1 + 1e-5) for row in curve)


@pytest.mark.parametrize("rho", [-3.0, -1.7, -1.16, 0.5 * (math.log(0.1) - 0.01)])
def test_closed_form_derivatives_equal_autograd(rho):
    """objective_terms against autograd of objective_from_terms, inside the grid and on j = 1."""
    sums = (3.7, 4.0, 4000 * math.log(1e-3))  # s ≈ 1e-3 for each of 4,000 weights: KL > 0
    kw = dict(num_params=4000, num_train=500, delta=0.025, b=100.0, c=0.1)
    t = torch.tensor(sums, dtype=F64, requires_grad=True)
    r = torch.tensor(rho, dtype=F64, requires_grad=True)
    obj, kl, bre = objective_from_terms(torch.tensor(0.3, dtype=F64), t[0], t[1], t[2], r, **kw)
    d_sums, d_rho = torch.autograd.grad(obj, [t, r])
    obj, kl, bre = obj.detach(), kl.detach(), bre.detach()
    got = objective_terms(0.3, *sums, rho, **kw)
    assert got.objective == pytest.approx(float(obj), rel=1e-14)
    assert (got.kl, got.b_re) == (pytest.approx(float(kl), rel=1e-13), pytest.approx(float(bre)))
    closed = (got.d_mean_dist_sq, got.d_var_sum, got.d_log_var_sum)
    assert closed == pytest.approx(d_sums.tolist(), rel=1e-12)
    assert got.d_rho == pytest.approx(float(d_rho), rel=1e-12, abs=1e-15)
    assert got.kl > 0 and min(abs(v) for v in closed) > 1e-6  # not a vacuous comparison


def _compiler_works() -> bool:
    try:
        v = torch.zeros(4, dtype=F64)
        Kernels.fused().prepare(FlatState.start(v, v, v), v, Workspace.like(v))
    except MeasureError:
        return False
    return True


@pytest.mark.skipif(not _compiler_works(), reason="torch.compile has no working C++ compiler")
@pytest.mark.parametrize("method", ["vanilla", "approx-hessian"])
def test_compiled_kernels_follow_the_eager_loop(monkeypatch, method):
    """--compile: the fused kernels reproduce the eager optimisation, three epochs in float64."""
    model = _net()
    x, y, params, w0, _, _ = _problem(model)
    keys = ["fc1.weight", "fc2.weight", "fc3.weight"]
    basis = _basis(model, keys) if method != "vanilla" else Basis()
    # mixed placement: fc3's noise on the activations, the rest rotated on the weights
    monkeypatch.setattr(optimize_mod, "activation_layers", lambda *a: frozenset(keys[2:]))
    kw = dict(
        method=method,
        epochs=3,
        lr=0.01,
        batch_size=16,
        seed=4,
        basis_fn=(lambda mean: basis) if method != "vanilla" else None,
    )
    eager, curve_e = optimize_posterior(model, x, y, w0, **kw)
    fused, curve_f = optimize_posterior(model, x, y, w0, compile=True, **kw)
    for k in params:
        torch.testing.assert_close(fused.mean[k], eager.mean[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fused.log_std[k], eager.log_std[k], rtol=1e-9, atol=1e-12)
    assert fused.rho == pytest.approx(eager.rho, rel=1e-10)
    assert [r["objective"] for r in curve_f] == pytest.approx(
        [r["objective"] for r in curve_e], rel=1e-10
    )
    moved = max(float((eager.mean[k] - params[k]).abs().max()) for k in params)
    assert moved > 1e-3  # the comparison is over a real trajectory, not the starting point
