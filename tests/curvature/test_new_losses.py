"""token-ce, mse and bce (CONTRACTS.md, Losses) against dense float64 truth built from torch's own
losses (``F.cross_entropy(..., ignore_index=-100)``, ``F.mse_loss``, ``F.binary_cross_entropy_with
_logits``) and, for confident predictions, against mpmath at 50 digits.

Models: an MLP regressor (tanh, so H != GGN), a multi-label MLP (bce), and a token model
(nn.Embedding + Linear over positions) whose targets have -100 positions and sequences with
different numbers of counted positions, so the sample loss (mean over ALL counted positions) and
the mean of per-sequence means differ.
"""

from __future__ import annotations

import mpmath
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, jacrev

from flatcli.curvature.diagonal import ggn_diagonal
from flatcli.curvature.gram import GramEngine, per_example_gradients
from flatcli.curvature.kfac import kfac_factors
from flatcli.curvature.losses import (
    binary_cross_entropy,
    get_loss,
    infer_loss,
    output_hessian,
    output_hessian_factor,
    sample_loss,
    token_cross_entropy,
)
from flatcli.curvature.operators import make_operator
from flatcli.errors import UsageError
from tests.references import exact_head, flat_logits, rel_err

F64 = torch.float64
V = 5


class TokenModel(nn.Module):
    """Embedding + tanh + Linear applied at every position: (N, T) ids -> (N, T, V) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, V)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(x)))


def _token_ref(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)


def _case(name: str):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "token-ce":
        model = TokenModel().double().eval()
        x = torch.randint(0, 7, (3, 4), generator=g)
        y = torch.randint(0, V, (3, 4), generator=g)
        y[0, 1] = -100
        y[2, :3] = -100  # counts 3, 4, 1: sample mean != mean of sequence means
        return model, x, y, _token_ref
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(6, 3, dtype=F64, generator=g)
    if name == "mse":
        return model, x, torch.randn(6, 2, dtype=F64, generator=g), F.mse_loss
    y = torch.rand(6, 2, dtype=F64, generator=g)
    return model, x, y, F.binary_cross_entropy_with_logits


NAMES = ("token-ce", "mse", "bce")
_TRUTH: dict[str, tuple] = {}


def _truth(name: str):
    """(model, x, y, ref, dense H, dense GGN) of the sample loss, by torch.func in float64."""
    if name in _TRUTH:
        return _TRUTH[name]
    model, x, y, ref = _case(name)
    theta, logits = flat_logits(model, x)

    H = hessian(lambda t: ref(logits(t), y))(theta)
    z = logits(theta).detach()
    J = jacrev(logits)(theta).reshape(z.numel(), -1)
    Hz = hessian(lambda zz: ref(zz.view(z.shape), y))(z.flatten())
    _TRUTH[name] = (model, x, y, ref, H, J.T @ Hz @ J)
    return _TRUTH[name]


@pytest.mark.parametrize("name", NAMES)
def test_sample_loss_is_torchs(name: str) -> None:
    model, x, y, ref = _case(name)
    with torch.no_grad():
        z = model(x)
    assert float(sample_loss(name, y)(z, y).mean()) == pytest.approx(float(ref(z, y)), rel=1e-14)


def test_token_per_example_is_a_sequence_mean() -> None:
    model, x, y, _ = _case("token-ce")
    with torch.no_grad():
        z = model(x)
    per = token_cross_entropy(z, y)
    for n in range(3):
        assert float(per[n]) == pytest.approx(float(_token_ref(z[n], y[n])), rel=1e-14)
    # the sample loss weighs sequences by their counted positions, not equally
    assert abs(float(per.mean()) - float(_token_ref(z, y))) > 1e-3


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_operators_match_dense_truth(name: str, kind: str) -> None:
    model, x, y, _, H, G = _truth(name)
    dense = make_operator(kind, model, x, y, loss_fn=name).to_dense()
    truth = H if kind == "hessian" else G
    assert rel_err(dense, truth) < 1e-12
    assert rel_err(H, G) > 1e-3  # tanh: the test tells H from the GGN


@pytest.mark.parametrize("name", NAMES)
def test_ggn_diagonal(name: str) -> None:
    model, x, y, _, _, G = _truth(name)
    d = ggn_diagonal(model, x, y, loss_fn=name)
    flat = torch.cat([d[n].flatten() for n, _ in model.named_parameters()])
    assert rel_err(flat, G.diagonal()) < 1e-12


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_per_example_gradient_rows(name: str, method: str) -> None:
    """Row n is the gradient of example n's loss: a sequence's mean over its counted positions,
    the mean over a regressor's or a multi-label net's outputs (torch's own losses per example)."""
    model, x, y, ref = _case(name)
    rows = []
    for n in range(x.shape[0]):
        loss = ref(model(x[n : n + 1]), y[n : n + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, model.parameters())]))
    J = torch.stack(rows)
    assert rel_err(per_example_gradients(model, x, y, loss_fn=get_loss(name)), J) < 1e-12
    engine = GramEngine(model, get_loss(name), method=method)
    xi = engine.grams(x, y, x.shape[0])[0]
    assert rel_err(xi, J @ J.T) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_output_hessian(name: str) -> None:
    """Q^T Q = the output Hessian of the sample loss's per-example term, by autograd."""
    model, x, y, _ = _case(name)
    with torch.no_grad():
        z = model(x)
    head = sample_loss(name, y)
    n = x.shape[0]
    scale = n / int((y != -100).sum()) if name == "token-ce" else 1.0
    Q = output_hessian_factor(name, z, y, torch.full((n,), scale, dtype=F64))
    for i in range(n):
        Hz = hessian(lambda zz, i=i: head(zz.unsqueeze(0), y[i : i + 1])[0])(z[i])
        k = z[i].numel()
        q = Q[i].reshape(-1, k)
        assert rel_err(q.T @ q, Hz.reshape(k, k)) < 1e-13


def _kfac_truth(name: str) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """E[M] of both layers of a ReLU MLP: 1/N sum_n G_n^T Hz_n G_n (Wu et al. 2020, Eq. 23)."""
    model, x, y, ref = _case(name)
    model = nn.Sequential(model[0], nn.ReLU(), model[2])
    z = model(x).detach()
    Hs = [hessian(lambda zz, i=i: ref(zz[None], y[i : i + 1]))(z[i]) for i in range(len(x))]
    h0 = model[0](x).detach()
    em0 = sum(
        jacrev(lambda h: model[2](model[1](h)))(h0[i]).T
        @ Hs[i]
        @ jacrev(lambda h: model[2](model[1](h)))(h0[i])
        for i in range(len(x))
    )
    return model, x, y, em0 / len(x), sum(Hs) / len(x)


@pytest.mark.parametrize("name", ["mse", "bce"])
def test_kfac_factors(name: str) -> None:
    model, x, y, em0, em2 = _kfac_truth(name)
    f = kfac_factors(model, x, y, loss=name)
    assert rel_err(f["2"].em, em2) < 1e-13 and rel_err(f["0"].em, em0) < 1e-13
    assert rel_err(f["0"].exx, x.T @ x / len(x)) < 1e-14


def test_kfac_token_factor_over_positions() -> None:
    """Output layer over T positions: E[M] = 1/(N T) sum_{n,t} (N / C) m_nt Lambda_nt (App. A.2's
    1/P with the sample loss's weights)."""
    model, x, y, _ = _case("token-ce")
    f = kfac_factors(model, x, y, loss="token-ce")
    with torch.no_grad():
        z = model(x)
    N, T = y.shape
    counted = (y != -100).to(F64)
    lam = output_hessian(z.reshape(-1, V)).reshape(N, T, V, V) * counted[..., None, None]
    truth = lam.sum(dim=(0, 1)) * (N / counted.sum()) / (N * T)
    assert f["out"].positions == T and rel_err(f["out"].em, truth) < 1e-13
    with pytest.raises(UsageError, match="mc"):
        kfac_factors(model, x, y, loss="token-ce", fisher="mc")


def test_fisher_refuses_the_new_losses() -> None:
    model, x, y, _ = _case("mse")
    with pytest.raises(UsageError, match="ggn"):
        make_operator("fisher", model, x, y, loss_fn="mse")


def test_infer_loss() -> None:
    assert infer_loss(torch.zeros(3, dtype=torch.int64)) == "ce"
    assert infer_loss(torch.zeros(3, 4, dtype=torch.int64)) == "token-ce"
    assert infer_loss(torch.zeros(3)) == "mse"
    assert infer_loss(torch.zeros(3, 2, dtype=F64)) == "mse"


# ------------------------------------------------------------------ confident predictions


def _mp_sigmoid(v: float) -> mpmath.mpf:
    return 1 / (1 + mpmath.exp(-mpmath.mpf(v)))


def test_bce_confident_is_exact() -> None:
    """1 - sigmoid(z) = e^-40 ~ 4e-18 (below float64's resolution at 1): the gradient
    -sigmoid(-z) and curvature sigmoid(z) sigmoid(-z) keep every digit (mpmath at 50 digits);
    sigmoid(z) - t, the textbook form, rounds the gradient to 0."""
    z = torch.tensor([[40.0, -38.0, 45.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 1.0]], dtype=F64)
    (g,) = torch.autograd.grad(binary_cross_entropy(z, t).sum(), z)
    q = output_hessian_factor("bce", z.detach(), t, torch.ones(1, dtype=F64))[0]
    with mpmath.workdps(50):
        for d, (zd, td) in enumerate(zip(z[0].tolist(), t[0].tolist(), strict=True)):
            s = _mp_sigmoid(zd)
            grad = (s - td) / 3
            curv = s * (1 - s) / 3
            assert float(g[0, d]) == pytest.approx(float(grad), rel=1e-14)
            assert float(q[d, d] ** 2) == pytest.approx(float(curv), rel=1e-14)
    naive = torch.sigmoid(z.detach()) - t
    assert float(naive[0, 0]) == 0.0  # what the exact form avoids


def test_token_ce_confident_is_exact() -> None:
    """Token logits whose label leads by 40-45 (1 - p ~ 1e-18): per-position gradient and
    output Hessian against mpmath's exact softmax head."""
    z = torch.tensor(
        [[[40.0, 0.0, -1.0], [0.5, 44.0, 0.0], [0.0, 0.0, 0.0]]], dtype=F64, requires_grad=True
    )
    y = torch.tensor([[0, 1, -100]])
    head = sample_loss("token-ce", y)  # N / C = 1 / 2
    (g,) = torch.autograd.grad(head(z, y).sum(), z)
    exact = exact_head(z.detach()[0, :2], y[0, :2])
    assert rel_err(g[0, :2], exact.residual / 2) < 1e-13
    assert float(g[0, 2].abs().max()) == 0.0
    Q = output_hessian_factor("token-ce", z.detach(), y, torch.full((1,), 0.5, dtype=F64))[0]
    Q = Q.reshape(-1, 9)
    H = (Q.T @ Q).reshape(3, 3, 3, 3)
    for t in range(2):
        assert rel_err(H[t, :, t, :], exact.hessian[t] / 2) < 1e-13
    assert float(H[2].abs().max()) == 0.0
    # the label entry of the Hessian, p_y (1 - p_y), survives
    assert float(H[0, 0, 0, 0]) > 0 and float(exact.hessian[0, 0, 0]) < 1e-16
