"""Algorithm 1's updates, the optimisation loop and the batched Monte-Carlo evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from flatcli.pacbayes.montecarlo import deterministic_error, sample_weights, snn_errors
from flatcli.pacbayes.optimize import Posterior, optimize_posterior, pacbayes_objective
from flatcli.pacbayes.posterior import Basis, LayerBasis
from tests.pacbayes.problem import build, make_data

F64 = torch.float64


def _orth(n: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0].to(dtype)


def _random_basis(model: nn.Module, dtype=F64) -> Basis:
    layers = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("weight"):
            layers[name] = LayerBasis(
                _orth(p.shape[0], 2 * i, dtype), _orth(p.shape[1], 2 * i + 1, dtype), tuple(p.shape)
            )
    return Basis(layers)


def test_autograd_gives_algorithm_1_updates():
    """∇_ς ℒ(w′) = ToHessian(∇_{w′}ℒ) ⊙ ξ ⊙ exp(ς) and ∇_w ℒ(w′) = ∇_{w′}ℒ (lines 12-13)."""
    model = build().double()
    data = make_data()
    x, y = data["x_train"].double(), data["y_train"]
    basis = _random_basis(model)
    mean = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    log_std = {
        k: (torch.full_like(v, -2.0) + 0.1 * torch.randn_like(v)).requires_grad_(True)
        for k, v in mean.items()
    }
    g = torch.Generator().manual_seed(0)
    xi = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in log_std.items()}
    noise = basis.to_standard({k: xi[k] * log_std[k].exp() for k in xi})
    w_prime = {k: mean[k] + noise[k] for k in mean}
    loss = F.cross_entropy(functional_call(model, w_prime, (x,)), y)
    g_mean = torch.autograd.grad(
        loss, list(mean.values()) + list(log_std.values()), retain_graph=True
    )
    wp = {k: v.detach().requires_grad_(True) for k, v in w_prime.items()}
    g_wp = torch.autograd.grad(
        F.cross_entropy(functional_call(model, wp, (x,)), y), list(wp.values())
    )
    g_wp = dict(zip(wp, g_wp, strict=True))
    expected_sigma = basis.to_hessian(g_wp)
    n = len(mean)
    for i, k in enumerate(mean):
        torch.testing.assert_close(g_mean[i], g_wp[k], rtol=1e-12, atol=1e-14)
        ref = expected_sigma[k] * xi[k] * log_std[k].detach().exp()
        torch.testing.assert_close(g_mean[n + i], ref, rtol=1e-10, atol=1e-14)


def test_objective_is_eq_46_with_kl_q_p():
    mean = {"w": torch.tensor([1.0, -2.0], dtype=F64)}
    w0 = {"w": torch.tensor([0.5, 0.0], dtype=F64)}
    log_std = {"w": torch.tensor([-1.0, -0.5], dtype=F64)}
    rho = torch.tensor(-1.2, dtype=F64)
    obj, kl, bre = pacbayes_objective(
        torch.tensor(0.3, dtype=F64),
        mean,
        log_std,
        rho,
        w0,
        num_train=1000,
        delta=0.025,
        b=100.0,
        c=0.1,
    )
    lam = math.exp(-2.4)
    s = [math.exp(-2.0), math.exp(-1.0)]
    ref_kl = 0.5 * (
        (sum(s) + 0.25 + 4.0) / lam - 2 + 2 * math.log(lam) - sum(math.log(v) for v in s)
    )
    j = 100.0 * math.log(0.1 / lam)
    ref_bre = (ref_kl + 2 * math.log(j) + math.log(math.pi**2 * 1000 / (6 * 0.025))) / 999
    assert float(kl) == pytest.approx(ref_kl, rel=1e-12)
    assert float(bre) == pytest.approx(ref_bre, rel=1e-12)
    assert float(obj) == pytest.approx(0.3 + math.sqrt(ref_bre / 2), rel=1e-12)


def _posterior(model: nn.Module, basis: Basis, scale: float = -3.0) -> Posterior:
    g = torch.Generator().manual_seed(5)
    mean = {k: v.detach().clone() for k, v in model.named_parameters()}
    log_std = {
        k: scale + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in mean.items()
    }
    return Posterior(mean, log_std, -3.0, basis)


@pytest.mark.parametrize("rotated", [False, True])
def test_batched_mc_equals_a_loop_of_single_forwards(rotated):
    model = build()
    data = make_data()
    x, y = data["x_train"], data["y_train"]
    post = _posterior(
        model, _random_basis(model, torch.float32) if rotated else Basis(), scale=-1.5
    )
    errs = snn_errors(model, post, x, y, samples=13, seed=3, sample_chunk=5, data_chunk=70)
    loop = []
    for k in range(13):
        w = {n: v[0] for n, v in sample_weights(post, range(k, k + 1), seed=3).items()}
        loop.append(deterministic_error(model, w, x, y))
    torch.testing.assert_close(errs, torch.tensor(loop, dtype=F64), rtol=0, atol=1e-12)
    assert float(errs.std()) > 0  # the samples differ
    again = snn_errors(model, post, x, y, samples=13, seed=3, sample_chunk=13, data_chunk=1000)
    torch.testing.assert_close(again, errs, rtol=0, atol=0)  # chunking changes nothing


def test_a_posterior_without_noise_has_the_deterministic_error():
    model = build()
    data = make_data()
    post = _posterior(model, Basis(), scale=-40.0)
    errs = snn_errors(model, post, data["x_test"], data["y_test"], samples=3, seed=0)
    det = deterministic_error(model, post.mean, data["x_test"], data["y_test"])
    assert errs.tolist() == [det] * 3


def test_optimisation_lowers_the_objective_and_is_seeded():
    model = build()
    data = make_data()
    x, y = data["x_train"], data["y_train"]
    w0 = {k: v.detach() + 0.05 for k, v in model.named_parameters()}
    kw = dict(epochs=8, lr=0.01, batch_size=60, seed=1)
    post, curve = optimize_posterior(model, x, y, w0, **kw)
    assert curve[-1]["objective"] < curve[0]["objective"]
    post2, curve2 = optimize_posterior(model, x, y, w0, **kw)
    assert curve == curve2
    for k in post.mean:
        assert torch.equal(post.mean[k], post2.mean[k]) and torch.equal(
            post.log_std[k], post2.log_std[k]
        )
    # the model itself is not touched
    ref = build()
    for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q)


def test_iterative_method_recomputes_the_basis_every_eta_epochs():
    model = build()
    data = make_data()
    calls = []

    def basis_fn(mean):
        calls.append({k: v.clone() for k, v in mean.items()})
        return (
            _random_basis(model, torch.float32)
            if len(calls) % 2
            else _random_basis(build(3), torch.float32)
        )

    w0 = {k: v.detach() for k, v in build(7).named_parameters()}
    post, curve = optimize_posterior(
        model,
        data["x_train"],
        data["y_train"],
        w0,
        method="iterative-hessian",
        epochs=7,
        eta=3,
        batch_size=80,
        basis_fn=basis_fn,
        lr=0.003,
    )
    assert len(calls) == 3  # epochs 0, 3 and 6
    assert curve[-1]["basis_recomputations"] == 2
    assert not torch.equal(calls[0]["fc1.weight"], calls[1]["fc1.weight"])  # at the current mean
    assert set(post.basis.layers) == {"fc1.weight", "fc2.weight"}
    assert all(math.isfinite(c["objective"]) for c in curve)
