"""The Fisher-trace regulariser (fisher-gamma-local-minima.md Eq. 6) against float64 truth.

The derivation in :mod:`flatcli.train.fisher_reg` says, with g_i the (held constant) gradient of
sub-batch i's hard-label loss and H_i its Hessian:

- value:    R_a = (a/M) sum_i |g_i|^2 - (a^2/2M) sum_i g_i' H_i g_i + O(a^3)
- gradient: grad R_a = (a/M) sum_i H_i g_i + O(a^2) = grad[(a/2M) sum_i |g_i(w)|^2] + O(a^2)

Each is checked with dense Hessians of tiny float64 models, and the error is checked to shrink
with the right order as a -> 0.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from flatcli.curvature.params import flatten_params, unflatten
from flatcli.train.fisher_reg import fisher_penalty
from tests.cases import make_case

M = 3
ALPHAS = (1e-2, 1e-3, 1e-4)
CASES = ("mlp_tanh", "cnn", "cnn_bn")  # cnn_bn runs in train mode: BatchNorm on batch statistics


def _case(name: str, n: int = 12):
    model, x, y = make_case(name, n=n)
    model.train()  # as during training; for cnn_bn, BatchNorm normalises with sub-batch statistics
    return model, x, y


def _names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _subbatch_loss_fn(model, xb, yb):
    """flat params -> mean hard-label CE of (xb, yb), buffers cloned so nothing is updated."""
    named = dict(model.named_parameters())
    shapes = {n: named[n].shape for n in _names(model)}

    def loss(flat):
        bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
        return F.cross_entropy(
            functional_call(model, {**unflatten(flat, shapes), **bufs}, (xb,)), yb
        )

    return loss


@functools.cache
def _truth_of(name: str):
    return _truth(*_case(name))


def _truth(model, x, y, m=M):
    """Per sub-batch flat gradient g_i and dense Hessian H_i (float64, autograd double backward)."""
    flat0 = flatten_params({n: p.detach() for n, p in model.named_parameters()})
    b = x.shape[0] // m
    gs, hs = [], []
    for i in range(m):
        f = _subbatch_loss_fn(model, x[i * b : (i + 1) * b], y[i * b : (i + 1) * b])
        w = flat0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(w), w)
        gs.append(g)
        hs.append(torch.autograd.functional.hessian(f, flat0, vectorize=True))
    return gs, hs


def _flat_grad(model, scalar):
    grads = torch.autograd.grad(scalar, [p for p in model.parameters() if p.requires_grad])
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name", CASES)
def test_value_is_alpha_times_mean_squared_subbatch_gradient_to_first_order(name):
    model, x, y = _case(name)
    gs, hs = _truth_of(name)
    s1 = torch.stack([g @ g for g in gs]).mean()  # (1/M) sum |g_i|^2
    s2 = -0.5 * torch.stack([g @ h @ g for g, h in zip(gs, hs, strict=True)]).mean()
    rel_errors = []
    for a in ALPHAS:
        pen = fisher_penalty(model, x, y, alpha=a, subbatches=M)
        torch.testing.assert_close(pen.grad_sq_norm, s1, rtol=1e-12, atol=0)
        value = pen.value.detach()
        rel_errors.append(float(abs(value / (a * s1) - 1)))
        # second-order coefficient: (R - a S1) / a^2 -> -(1/2M) sum g' H g, error O(a)
        torch.testing.assert_close((value - a * s1) / a**2, s2, rtol=3 * a, atol=1e-6)
    # first-order relative error shrinks in proportion to alpha
    for e_big, e_small in zip(rel_errors, rel_errors[1:], strict=False):
        assert 0.07 < e_small / e_big < 0.13
    assert rel_errors[-1] < 1e-3


@pytest.mark.parametrize("name", CASES)
def test_gradient_is_alpha_over_m_sum_of_hessian_times_g(name):
    model, x, y = _case(name)
    gs, hs = _truth_of(name)
    target = torch.stack([h @ g for g, h in zip(gs, hs, strict=True)]).mean(0)  # (1/M) sum H_i g_i
    rel_errors = []
    for a in ALPHAS:
        grad = _flat_grad(model, fisher_penalty(model, x, y, alpha=a, subbatches=M).value)
        rel_errors.append(float((grad / a - target).norm() / target.norm()))
    for e_big, e_small in zip(rel_errors, rel_errors[1:], strict=False):
        assert 0.07 < e_small / e_big < 0.13
    assert rel_errors[-1] < 1e-3


@pytest.mark.parametrize("name", ("mlp_tanh", "cnn_bn"))
def test_gradient_is_that_of_half_the_value_surrogate(name):
    """grad R_a ~ grad[(a/2M) sum_i |g_i(w)|^2] by double backprop: no Hessian formed."""
    model, x, y = _case(name)
    a = 1e-5
    params = [p for p in model.parameters() if p.requires_grad]
    b = x.shape[0] // M
    surrogate = 0.0
    for i in range(M):
        f = _subbatch_loss_fn(model, x[i * b : (i + 1) * b], y[i * b : (i + 1) * b])
        names = _names(model)
        flat = flatten_params(dict(zip(names, params, strict=True)))
        (g,) = torch.autograd.grad(f(flat), flat, create_graph=True)
        surrogate = surrogate + a / (2 * M) * (g @ g)
    expected = _flat_grad(model, surrogate)
    got = _flat_grad(model, fisher_penalty(model, x, y, alpha=a, subbatches=M).value)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("name", CASES)
def test_matches_a_loop_over_subbatches(name):
    """vmap over sub-batches = a plain loop; 13 examples: the 13th is left out of R."""
    model, x, y = _case(name, n=13)
    a = 1e-3
    names = _names(model)
    named = dict(model.named_parameters())
    b = 13 // M
    value = 0.0
    for i in range(M):
        xb, yb = x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]

        def loss(p, xb=xb, yb=yb):
            bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
            return F.cross_entropy(functional_call(model, {**p, **bufs}, (xb,)), yb)

        detached = {n: named[n].detach().requires_grad_(True) for n in names}
        g = torch.autograd.grad(loss(detached), list(detached.values()))
        here = {n: named[n] for n in names}
        moved = {n: named[n] - a * gi for n, gi in zip(names, g, strict=True)}
        value = value + (loss(here) - loss(moved)) / M
    pen = fisher_penalty(model, x, y, alpha=a, subbatches=M)
    assert pen.subbatch_size == b and pen.subbatches == M
    torch.testing.assert_close(pen.value, value, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(_flat_grad(model, pen.value), _flat_grad(model, value))


def test_dropout_draws_the_same_masks_in_every_subbatch_pass():
    """With dropout the value is still a*S to first order: all passes share their masks."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
    ).double()
    _, x, y = make_case("mlp_tanh", n=12)
    a = 1e-5
    pen = fisher_penalty(model, x, y, alpha=a, subbatches=M)
    assert abs(float(pen.value.detach() / (a * pen.grad_sq_norm)) - 1) < 1e-3
    # the same global random state gives the same value
    torch.manual_seed(5)
    first = fisher_penalty(model, x, y, alpha=a, subbatches=M).value
    torch.manual_seed(5)
    assert torch.equal(fisher_penalty(model, x, y, alpha=a, subbatches=M).value, first)


def test_batchnorm_running_statistics_and_weights_are_left_alone():
    model, x, y = _case("cnn_bn")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fisher_penalty(model, x, y, alpha=1e-3, subbatches=M).value.backward()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_subbatches_out_of_range():
    model, x, y = _case("mlp_tanh", n=4)
    with pytest.raises(ValueError, match="subbatches"):
        fisher_penalty(model, x, y, alpha=1e-3, subbatches=5)
