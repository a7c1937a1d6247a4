"""The Fisher-trace regulariser (Jia & Su 2020, Eq. 6) against float64 truth.

:mod:`flatcli.train.fisher_reg` evaluates Eq. 6 to first order, without cancellation. With g_i
the (held constant) gradient of sub-batch i's hard-label loss and H_i its Hessian:

- value:    R = (a/M) sum_i |g_i|^2 exactly; Eq. 6 is R - (a^2/2M) sum_i g_i' H_i g_i + O(a^3)
- gradient: grad R = (a/M) sum_i H_i g_i exactly = grad[(a/2M) sum_i |g_i(w)|^2];
  Eq. 6's gradient (g_i constant) differs by O(a^2)

Each is checked with dense Hessians of tiny float64 models, the difference to Eq. 6 is checked to
shrink with the right order as a -> 0, and float32 networks at training losses 1e-2 .. 1e-5 are
checked against a float64 evaluation of Eq. 6 (where the old float32 finite difference fails).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
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


def _ce(logits, y):
    """Mean cross-entropy straight from log-softmax (independent of flatcli's loss heads)."""
    return -torch.log_softmax(logits, -1).gather(1, y[:, None]).mean()


def _subbatch_loss_fn(model, xb, yb):
    """flat params -> mean hard-label CE of (xb, yb), buffers cloned so nothing is updated."""
    named = dict(model.named_parameters())
    shapes = {n: named[n].shape for n in _names(model)}

    def loss(flat):
        bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
        return _ce(functional_call(model, {**unflatten(flat, shapes), **bufs}, (xb,)), yb)

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


def _eq6(model, x, y, alpha, m):
    """Eq. 6 literally, a loop over sub-batches: (1/M) sum_i [L_i(w) - L_i(w - a g_i)] with g_i
    a constant, and its gradient. In the model's dtype (the reference when float64)."""
    names = _names(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = x.shape[0] // m
    value = 0.0
    for i in range(m):
        xb, yb = x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]

        def loss(p, xb=xb, yb=yb):
            bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
            return _ce(functional_call(model, {**p, **bufs}, (xb,)), yb)

        detached = {n: params[n].detach().requires_grad_(True) for n in names}
        g = torch.autograd.grad(loss(detached), list(detached.values()))
        moved = {n: params[n] - alpha * gi for n, gi in zip(names, g, strict=True)}
        value = value + (loss(params) - loss(moved)) / m
    return value.detach(), _flat_grad(model, value)


def _flat_grad(model, scalar):
    grads = torch.autograd.grad(scalar, [p for p in model.parameters() if p.requires_grad])
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name", CASES)
def test_value_is_alpha_times_mean_squared_subbatch_gradient(name):
    model, x, y = _case(name)
    gs, _ = _truth_of(name)
    s1 = torch.stack([g @ g for g in gs]).mean()  # (1/M) sum |g_i|^2
    for a in ALPHAS:
        pen = fisher_penalty(model, x, y, alpha=a, subbatches=M)
        torch.testing.assert_close(pen.grad_sq_norm, s1, rtol=1e-12, atol=0)
        torch.testing.assert_close(pen.value.detach(), a * s1, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_value_differs_from_eq6_by_its_second_order_term(name):
    """(Eq. 6 - R) / a^2 -> -(1/2M) sum g' H g with error O(a): R is Eq. 6 to first order."""
    model, x, y = _case(name)
    gs, hs = _truth_of(name)
    s2 = -0.5 * torch.stack([g @ h @ g for g, h in zip(gs, hs, strict=True)]).mean()
    for a in ALPHAS:
        eq6, _ = _eq6(model, x, y, a, M)
        value = fisher_penalty(model, x, y, alpha=a, subbatches=M).value.detach()
        torch.testing.assert_close((eq6 - value) / a**2, s2, rtol=3 * a, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_gradient_is_alpha_over_m_sum_of_hessian_times_g(name):
    model, x, y = _case(name)
    gs, hs = _truth_of(name)
    target = torch.stack([h @ g for g, h in zip(gs, hs, strict=True)]).mean(0)  # (1/M) sum H_i g_i
    for a in ALPHAS:
        got = _flat_grad(model, fisher_penalty(model, x, y, alpha=a, subbatches=M).value)
        torch.testing.assert_close(got, a * target, rtol=1e-9, atol=1e-12 * a)


@pytest.mark.parametrize("name", CASES)
def test_gradient_differs_from_eq6s_by_order_alpha_relative(name):
    """Eq. 6's gradient with g_i constant = ours + O(a^2): the relative gap shrinks like a."""
    model, x, y = _case(name)
    rel = []
    for a in ALPHAS:
        _, eq6_grad = _eq6(model, x, y, a, M)
        got = _flat_grad(model, fisher_penalty(model, x, y, alpha=a, subbatches=M).value)
        rel.append(float((got - eq6_grad).norm() / eq6_grad.norm()))
    for e_big, e_small in zip(rel, rel[1:], strict=False):
        assert 0.07 < e_small / e_big < 0.13
    assert rel[-1] < 1e-3


@pytest.mark.parametrize("name", ("mlp_tanh", "cnn_bn"))
def test_gradient_is_that_of_half_the_value_surrogate(name):
    """grad R = grad[(a/2M) sum_i |g_i(w)|^2] by plain double backprop over a loop."""
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
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("name", CASES)
def test_matches_a_loop_over_subbatches(name):
    """vmap over sub-batches = a plain loop of <g_i(w), sg(g_i)>; the 13th example is left out."""
    model, x, y = _case(name, n=13)
    a = 1e-3
    names = _names(model)
    named = dict(model.named_parameters())
    b = 13 // M
    value = 0.0
    for i in range(M):
        xb, yb = x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]
        bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
        loss = _ce(functional_call(model, {**named, **bufs}, (xb,)), yb)
        g = torch.autograd.grad(loss, [named[n] for n in names], create_graph=True)
        value = value + a / M * sum((gi * gi.detach()).sum() for gi in g)
    pen = fisher_penalty(model, x, y, alpha=a, subbatches=M)
    assert pen.subbatch_size == b and pen.subbatches == M
    torch.testing.assert_close(pen.value, value, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(_flat_grad(model, pen.value), _flat_grad(model, value))


def test_dropout_value_and_gradient_come_from_one_pass():
    """With dropout the value is still a*S exactly, and a fixed global seed fixes the result."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
    ).double()
    _, x, y = make_case("mlp_tanh", n=12)
    a = 1e-5
    pen = fisher_penalty(model, x, y, alpha=a, subbatches=M)
    torch.testing.assert_close(pen.value.detach(), a * pen.grad_sq_norm, rtol=1e-14, atol=0)
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


# --- float32 networks late in training ---------------------------------------------------


@functools.cache
def _trained_float32(act: str):
    """A float32 MLP trained (Adam, full batch) to classify 64 clustered points, 4 classes."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    n, d, k = 64, 10, 4
    centers = 2 * torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    a = {"tanh": nn.Tanh, "relu": nn.ReLU}[act]
    model = nn.Sequential(nn.Linear(d, 16), a(), nn.Linear(16, 16), a(), nn.Linear(16, k))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert bool((model(x).argmax(1) == y).all())
    return model, x, y


def _at_training_loss(model, x, y, target):
    """Copy of ``model`` with the last layer scaled so the float64 mean loss is ``target``
    (every example is classified correctly, so the loss falls monotonically with the scale)."""
    with torch.no_grad():
        h = model[:-1](x).double()
        w, b = model[-1].weight.double(), model[-1].bias.double()

        def loss(log2s):
            return float(F.cross_entropy(2.0**log2s * (h @ w.T + b), y))

        lo, hi = -8.0, 8.0
        while loss(hi) > target:
            hi += 4
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if loss(mid) > target else (lo, mid)
        scaled = copy.deepcopy(model)
        scaled[-1].weight.mul_(2.0**hi)
        scaled[-1].bias.mul_(2.0**hi)
    return scaled


@pytest.mark.parametrize("act", ("tanh", "relu"))
@pytest.mark.parametrize("target", (1e-2, 1e-3, 1e-4, 1e-5))
def test_float32_network_matches_float64_eq6_at_tiny_training_loss(act, target):
    """Value and gradient of the float32 regulariser within 1 % of Eq. 6 evaluated in float64."""
    base, x, y = _trained_float32(act)
    model = _at_training_loss(base, x, y, target)
    assert float(F.cross_entropy(model(x), y).detach()) == pytest.approx(target, rel=1e-3)
    alpha, m = 1e-4, 4
    pen = fisher_penalty(model, x, y, alpha=alpha, subbatches=m)
    got_value = float(pen.value.detach())
    got_grad = _flat_grad(model, pen.value).double()
    ref = copy.deepcopy(model).double()
    ref_value, ref_grad = _eq6(ref, x.double(), y, alpha, m)
    assert ref_value > 0
    assert abs(got_value / float(ref_value) - 1) < 1e-2
    assert float((got_grad - ref_grad).norm() / ref_grad.norm()) < 1e-2
    # the same first-order quantities in float64: float32 loses far less than the 1 % above
    pen64 = fisher_penalty(ref, x.double(), y, alpha=alpha, subbatches=m)
    assert abs(got_value / float(pen64.value.detach()) - 1) < 1e-4
    grad64 = _flat_grad(ref, pen64.value)
    assert float((got_grad - grad64).norm() / grad64.norm()) < 1e-4
    if target <= 1e-3:  # Eq. 6 as a float32 finite difference (flatcli 0.1.0) fails here
        old_value, old_grad = _eq6(model, x, y, alpha, m)
        old_err = max(
            abs(float(old_value) / float(ref_value) - 1),
            float((old_grad.double() - ref_grad).norm() / ref_grad.norm()),
        )
        assert old_err > 0.1
