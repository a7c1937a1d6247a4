"""The directions: filter normalisation filter by filter, the seed's draws, the unit gradient,
the Hessian's top eigenvectors against a dense float64 ``eigh``, the line to a checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from flatcli.curvature.losses import cross_entropy
from flatcli.errors import UsageError
from flatcli.landscape.directions import (
    difference_direction,
    gaussian_directions,
    gradient_direction,
    hessian_directions,
    load_other,
)
from tests.cases import make_case
from tests.references import dense_hessian

F64 = torch.float64


def _theta(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["cnn_bn", "mlp_relu"])
def test_every_filter_gets_the_norm_of_its_filter_in_theta(case):
    model, _, _ = make_case(case)
    theta = _theta(model)
    (d,) = gaussian_directions(theta, 1, seed=3)
    gen = torch.Generator().manual_seed(3)
    raw = {n: torch.randn(t.shape, generator=gen, dtype=F64) for n, t in theta.items()}
    weights = 0
    for name, t in theta.items():
        if t.dim() < 2:  # biases, BatchNorm's weight and bias: not perturbed
            assert torch.count_nonzero(d[name]) == 0, name
            continue
        weights += 1
        for j in range(t.shape[0]):  # each output filter: a conv channel, a linear row
            assert d[name][j].norm() == pytest.approx(float(t[j].norm()), rel=1e-12)
            # the Gaussian draw of that filter, rescaled: same direction
            unit = raw[name][j] / raw[name][j].norm()
            assert torch.allclose(d[name][j] / d[name][j].norm(), unit, rtol=0, atol=1e-14)
    assert weights >= 2


def test_a_zero_filter_of_theta_gives_a_zero_filter():
    theta = {"w": torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=F64)}
    (d,) = gaussian_directions(theta, 1, seed=0)
    assert torch.count_nonzero(d["w"][0]) == 0
    assert d["w"][1].norm() == pytest.approx(5**0.5, rel=1e-14)


def test_same_seed_same_directions_and_the_line_is_the_planes_first_axis():
    model, _, _ = make_case("cnn_bn")
    theta = _theta(model)
    a1, a2 = gaussian_directions(theta, 2, seed=7)
    b1, b2 = gaussian_directions(theta, 2, seed=7)
    (c1,) = gaussian_directions(theta, 1, seed=7)
    (e1,) = gaussian_directions(theta, 1, seed=8)
    for n in theta:
        assert torch.equal(a1[n], b1[n]) and torch.equal(a2[n], b2[n]) and torch.equal(a1[n], c1[n])
    assert any(not torch.equal(a1[n], e1[n]) for n in theta)
    assert any(not torch.equal(a1[n], a2[n]) for n in theta)


def test_unnormalised_directions_are_the_plain_standard_gaussian():
    model, _, _ = make_case("mlp_tanh")
    theta = _theta(model)
    (d,) = gaussian_directions(theta, 1, seed=5, normalization="none")
    gen = torch.Generator().manual_seed(5)
    for name, t in theta.items():
        assert torch.equal(d[name], torch.randn(t.shape, generator=gen, dtype=F64))


def test_directions_take_the_dtype_of_theta_from_the_same_float64_draws():
    model, _, _ = make_case("mlp_tanh")
    theta64 = _theta(model)
    theta32 = {n: t.float() for n, t in theta64.items()}
    (d64,) = gaussian_directions(theta64, 1, seed=1)
    (d32,) = gaussian_directions(theta32, 1, seed=1)
    for n in theta64:
        assert d32[n].dtype == torch.float32
        assert torch.allclose(d32[n].double(), d64[n], rtol=1e-6, atol=1e-7)


def test_the_gradient_direction_is_the_unit_gradient_of_the_mean_loss():
    model, x, y = make_case("cnn_bn")
    unit, gnorm = gradient_direction(model, x, y, cross_entropy, batch_size=5)
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    dense = torch.cat([g.reshape(-1) for g in grads])
    ours = torch.cat([unit[n].reshape(-1) for n, _ in model.named_parameters()])
    assert gnorm == pytest.approx(float(dense.norm()), rel=1e-12)
    assert torch.allclose(ours, dense / dense.norm(), rtol=0, atol=1e-13)
    assert float(ours.norm()) == pytest.approx(1.0, rel=1e-14)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script:FutureWarning")
@pytest.mark.parametrize("case", ["mlp_tanh", "cnn_bn"])
def test_hessian_directions_are_the_top_eigenvectors_of_the_dense_hessian(case):
    model, x, y = make_case(case)
    dirs, info = hessian_directions(
        model, x, y, 2, loss="ce", head_dtype=F64, batch_size=None, seed=0
    )
    H = dense_hessian(model, x, y)
    lam, vecs = torch.linalg.eigh(H)
    assert info["eigenvalues"] == pytest.approx(lam.flip(0)[:2].tolist(), rel=1e-9)
    assert info["eigenvalues"][0] >= info["eigenvalues"][1]
    names = [n for n, _ in model.named_parameters()]
    for k, d in enumerate(dirs):
        v = torch.cat([d[n].reshape(-1) for n in names])
        assert float(v.norm()) == pytest.approx(1.0, rel=1e-12)
        assert v[v.abs().argmax()] > 0  # the sign convention
        u = vecs[:, -1 - k]
        assert abs(float(v @ u)) == pytest.approx(1.0, abs=1e-9)
        # an eigenvector to Lanczos' tolerance (1e-5 |λ₁|): ‖H v − λ v‖ as Lanczos reports it
        residual = float((H @ v - info["eigenvalues"][k] * v).norm())
        assert residual <= 2 * info["residuals"][k] + 1e-12
        assert residual <= 1e-5 * info["eigenvalues"][0]


def test_the_line_to_another_checkpoint_is_their_difference(tmp_path):
    a, _, _ = make_case("mlp_tanh", seed=0)
    b, _, _ = make_case("mlp_tanh", seed=1)
    save_file(
        {f"module.{n}": t for n, t in b.state_dict().items()}, str(tmp_path / "b.safetensors")
    )
    other, sha = load_other(tmp_path / "b.safetensors", a)  # the DDP prefix is stripped
    assert len(sha) == 64
    d = difference_direction(_theta(a), other)
    for n, p in a.named_parameters():
        assert torch.equal(p.detach() + d[n], dict(b.named_parameters())[n].detach())


def test_another_architecture_is_refused_naming_the_first_parameter_that_differs(tmp_path):
    a, _, _ = make_case("mlp_tanh")
    wide = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(
        UsageError, match=r"parameter 1\.weight has shape \(7, 6\) there and \(5, 6\)"
    ):
        load_other(tmp_path / "wide.pt", a)
    short = {k: v for k, v in a.state_dict().items() if not k.startswith("5.")}
    torch.save(short, tmp_path / "short.pt")
    with pytest.raises(UsageError, match=r"no parameter 5\.weight"):
        load_other(tmp_path / "short.pt", a)
    more = {**a.state_dict(), "6.weight": torch.zeros(2)}
    torch.save(more, tmp_path / "more.pt")
    with pytest.raises(UsageError, match=r"6\.weight that the model lacks"):
        load_other(tmp_path / "more.pt", a)
    with pytest.raises(UsageError, match="no checkpoint file"):
        load_other(tmp_path / "missing.pt", a)
