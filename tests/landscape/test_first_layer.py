"""The input layer computed once per batch (linear in its weights): which layers qualify, and
the same numbers as computing it at every point."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatcli.curvature.losses import cross_entropy
from flatcli.landscape.directions import gaussian_directions
from flatcli.landscape.evaluate import evaluate_points
from flatcli.landscape.first_layer import find_first_layer
from flatcli.measures.landscape import LandscapeConfig, compute_landscape
from tests.cases import make_case

F64 = torch.float64


class Scaled(nn.Module):
    """A parameter of the root module itself: the factoring must not apply."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.scale)


class Twice(nn.Module):
    """The input layer applied twice: the factoring must not apply."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))[:, :3]


def test_which_input_layers_are_factored():
    x = torch.randn(4, 2, 4, 4, dtype=F64)
    assert find_first_layer(make_case("cnn_bn")[0], x).name == "0"  # a Conv2d
    assert find_first_layer(make_case("mlp_tanh")[0], x[:, :1, :2, :3]).name == "1"  # after Flatten
    bn_first = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)).double().eval()
    x6 = torch.randn(4, 6, dtype=F64)
    assert find_first_layer(bn_first, x6) is None  # BatchNorm's buffers before it
    assert find_first_layer(Scaled().double(), x6) is None
    assert find_first_layer(Twice().double(), x6) is None
    tied = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    tied[2].weight = tied[0].weight
    assert find_first_layer(tied, x6) is None


@pytest.mark.parametrize("case", ["cnn_bn", "mlp_tanh"])
@pytest.mark.parametrize("per_pass", [1, 3])
def test_factored_and_plain_evaluation_agree(case, per_pass):
    model, x, y = make_case(case, n=7)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    dirs = gaussian_directions(theta, 2, seed=1)
    points = [(a, b) for a in (-0.5, 0.0, 0.7) for b in (-0.3, 0.4)]
    first = find_first_layer(model, x)
    common = dict(batch_size=3, points_per_pass=per_pass)
    plain = evaluate_points(model, x, y, theta, dirs, points, cross_entropy, **common)
    fast = evaluate_points(model, x, y, theta, dirs, points, cross_entropy, first=first, **common)
    assert torch.allclose(fast[0], plain[0], rtol=1e-13, atol=0)
    assert torch.equal(fast[1], plain[1])
    assert "forward" not in vars(first.module)  # the layer's own forward is back


def test_the_report_names_the_factored_layer():
    model, x, y = make_case("cnn_bn", n=5)
    details = compute_landscape(model, x, y, LandscapeConfig(steps=5)).details()
    assert details["evaluation"]["first_layer"] == "0"
