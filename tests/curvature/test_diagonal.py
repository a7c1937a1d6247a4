"""Hessian and GGN diagonals against dense float64 matrices built with torch.func."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatcli.curvature import diagonal
from flatcli.curvature.diagonal import curvature_diagonal, ggn_diagonal, group_seed
from flatcli.curvature.losses import get_loss
from flatcli.curvature.params import flatten_params
from flatcli.errors import UsageError
from tests.cases import make_case
from tests.references import dense_ggn, dense_hessian

CASES = ("mlp_tanh", "cnn_bn")


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("loss", ["ce", "nsce"])
def test_exact_diagonal_matches_dense_hessian(name: str, loss: str) -> None:
    model, x, y = make_case(name)
    H = dense_hessian(model, x, y, loss_fn=get_loss(loss))
    est = curvature_diagonal(model, x, y, method="exact", loss_fn=loss, batch_size=len(x))
    torch.testing.assert_close(flatten_params(est.values), H.diagonal(), rtol=0, atol=1e-10)
    assert est.stderr is None and est.matrix == "hessian" and est.products == H.shape[0]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("loss", ["ce", "nsce"])
def test_ggn_diagonal_matches_dense_ggn(name: str, loss: str) -> None:
    model, x, y = make_case(name)
    G = dense_ggn(model, x, y, loss_fn=get_loss(loss))
    diag = ggn_diagonal(model, x, y, loss_fn=loss, batch_size=5)  # several chunks
    torch.testing.assert_close(flatten_params(diag), G.diagonal(), rtol=0, atol=1e-10)


class _Mixed(nn.Module):
    """Layers the capture treats differently: a grouped strided conv, a Linear over positions
    (T > 1), a LayerNorm (generic rows), a Linear called twice, and a bias-free Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.seq = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.twice = nn.Linear(3, 3)
        self.head = nn.Linear(12, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # (N, 4 positions, 4)
        h = self.norm(self.seq(h))
        h = self.twice(torch.tanh(self.twice(h)))
        return self.head(h.flatten(1))


def _tied() -> nn.Module:
    """A parameter used outside its module's forward: the capture refuses, vmap(jacrev) runs."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x) + x[:, :4] @ self.a.weight[:, :4].T))

    return Tied()


@pytest.mark.parametrize("build", ["mixed", "tied"])
@pytest.mark.parametrize("loss", ["ce", "nsce"])
def test_ggn_diagonal_capture_and_fallback_match_dense(
    build: str, loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = (_Mixed() if build == "mixed" else _tied()).double().eval()
    shape = (2, 4, 4) if build == "mixed" else (6,)
    x = torch.randn(10, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    used = []
    real = diagonal._jacobian_ggn_diagonal
    monkeypatch.setattr(diagonal, "_jacobian_ggn_diagonal", lambda *a: used.append(1) or real(*a))
    G = dense_ggn(model, x, y, loss_fn=get_loss(loss))
    diag = ggn_diagonal(model, x, y, loss_fn=loss, batch_size=12)  # chunks of 4 examples
    torch.testing.assert_close(flatten_params(diag), G.diagonal(), rtol=0, atol=1e-10)
    assert list(diag) == [name for name, _ in model.named_parameters()]
    assert bool(used) == (build == "tied")  # the capture ran wherever it can


def test_ggn_differs_from_hessian_for_smooth_nets() -> None:
    model, x, y = make_case("mlp_tanh")
    g = flatten_params(ggn_diagonal(model, x, y, loss_fn="ce"))
    h = dense_hessian(model, x, y, loss_fn=get_loss("ce")).diagonal()
    assert (g - h).abs().max() > 1e-6


def test_selected_parameters_only() -> None:
    model, x, y = make_case("mlp_tanh")
    H = dense_hessian(model, x, y, loss_fn=get_loss("ce"))
    est = curvature_diagonal(
        model, x, y, method="exact", loss_fn="ce", params=["3.weight"], batch_size=len(x)
    )
    assert list(est.values) == ["3.weight"]
    offset = 6 * 5 + 5
    torch.testing.assert_close(
        est.values["3.weight"].reshape(-1), H.diagonal()[offset : offset + 20], rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("name", CASES)
def test_hutchinson_within_its_standard_error(name: str) -> None:
    model, x, y = make_case(name)
    H = dense_hessian(model, x, y, loss_fn=get_loss("nsce"))
    hutchinson = dict(method="hutchinson", loss_fn="nsce", probes=400, groups=8, seed=3)
    est = curvature_diagonal(model, x, y, **hutchinson, batch_size=len(x))
    z = (flatten_params(est.values) - H.diagonal()).abs() / flatten_params(est.stderr)
    assert est.probes == 400 and est.products == 400 and est.group_values.shape == (8, H.shape[0])
    assert float(z.mean()) < 1.2  # E|N(0,1)| = 0.80
    assert float((z > 4).float().mean()) < 0.01
    torch.testing.assert_close(est.group_values.mean(dim=0), flatten_params(est.values))
    # same seed, same numbers
    again = curvature_diagonal(model, x, y, **hutchinson, batch_size=len(x))
    torch.testing.assert_close(
        flatten_params(again.values), flatten_params(est.values), rtol=0, atol=0
    )


def test_group_seeds_differ_and_errors() -> None:
    assert len({group_seed(0, g) for g in range(50)} | {group_seed(1, g) for g in range(50)}) == 100
    model, x, y = make_case("mlp_tanh")
    with pytest.raises(UsageError, match="Unknown diagonal method"):
        curvature_diagonal(model, x, y, method="kfac")
