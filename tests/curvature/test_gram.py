"""Per-example Gram engine against the dense float64 per-example Jacobian built by torch.func."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatcli.curvature.gram import (
    GramEngine,
    gram_spectrum,
    per_example_gradients,
    per_example_gram,
    per_example_grams,
    per_example_sq_norms,
)
from flatcli.curvature.losses import cross_entropy
from flatcli.errors import UsageError
from tests.cases import make_case
from tests.references import dense_jacobian

F64 = torch.float64
METHODS = ("ghost", "materialize")


# ---------------------------------------------------------------- extra tiny models


class Scaled(nn.Module):
    """A module with its own parameter next to a child module (generic vmap path)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


class Twice(nn.Module):
    """One Linear applied twice (shared weights), the second time followed by an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(torch.relu_(self.a(h)))


class Tied(nn.Module):
    """Two Linear modules holding the same weight tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))[:, :3]


class Functional(nn.Module):
    """The parent reads its child's weight outside the child's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + torch.tanh(x[:, :3]) @ self.a.weight[:, :3].T


def _extra_case(name: str, n: int = 12):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    if name == "conv_stride":  # stride, padding, groups, bias=False Linear, in-place ReLU
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 4, 2, padding=1, bias=False, groups=2),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3, bias=False),
        )
        shape = (2, 6, 6)
    elif name == "conv_wide":  # a conv on the grouped-convolution path (output map >= 512)
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=2, dilation=2, stride=1),
            nn.Softplus(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        shape = (1, 24, 24)
    elif name == "seq3d_ln":  # Linear on (N, T, in) inputs, LayerNorm
        model = nn.Sequential(
            nn.Linear(5, 4),
            nn.LayerNorm(4),
            nn.Tanh(),
            nn.Linear(4, 6),
            nn.Unflatten(1, (3, 2)),
            nn.Linear(2, 4),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(12, 3),
        )
        shape = (5,)
    elif name == "conv1d_custom":  # Conv1d, 'same' reflect padding, custom parameter, PReLU
        model = nn.Sequential(
            nn.Conv1d(2, 3, 3, padding="same", padding_mode="reflect"),
            nn.Softplus(),
            nn.Flatten(),
            nn.Linear(3 * 7, 3),
            Scaled(),
            nn.PReLU(),
        )
        shape = (2, 7)
    elif name == "twice_inplace":
        model, shape = Twice(), (4,)
    else:
        raise KeyError(name)
    model = model.double().eval()
    x = torch.randn((n, *shape), generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


CASES = (
    "mlp_tanh",
    "mlp_relu",
    "cnn",
    "cnn_bn",
    "conv_stride",
    "conv_wide",
    "seq3d_ln",
    "conv1d_custom",
    "twice_inplace",
)


def _case(name: str, n: int = 12):
    if name in ("mlp_tanh", "mlp_relu", "cnn", "cnn_bn"):
        return make_case(name, n=n)
    return _extra_case(name, n=n)


# ---------------------------------------------------------------- the Gram itself


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_gram_equals_dense_jacobian_gram(name, method):
    model, x, y = _case(name)
    J = dense_jacobian(model, x, y)
    engine = GramEngine(model, method=method, chunk_size=5)
    xi = engine.grams(x, y)[0]
    assert engine.method.value == method, engine.fallback_reason
    torch.testing.assert_close(xi, J @ J.T, rtol=0, atol=1e-10)
    # blocks of 4 consecutive examples: the diagonal blocks of the full Gram
    blocks = engine.grams(x, y, 4)
    for b in range(3):
        s = slice(4 * b, 4 * b + 4)
        torch.testing.assert_close(blocks[b], (J @ J.T)[s, s], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ("cnn_bn", "conv_stride", "seq3d_ln", "conv1d_custom"))
def test_norms_and_materialised_rows(name):
    model, x, y = _case(name)
    J = dense_jacobian(model, x, y)
    torch.testing.assert_close(
        per_example_sq_norms(model, x, y), (J * J).sum(1), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(per_example_gradients(model, x, y), J, rtol=0, atol=1e-12)
    torch.testing.assert_close(per_example_gram(model, x, y), J @ J.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_chunk_size_changes_only_round_off(method):
    model, x, y = _case("cnn_bn", n=12)
    ref = per_example_grams(model, x, y, 6, method=method, chunk_size=12)
    for chunk in (1, 5, 7):
        other = per_example_grams(model, x, y, 6, method=method, chunk_size=chunk)
        torch.testing.assert_close(other, ref, rtol=1e-13, atol=1e-13)


def test_parameter_subset():
    model, x, y = _case("cnn_bn")
    J = dense_jacobian(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    cols, start = [], 0
    for n, p in model.named_parameters():
        if n in ("0.weight", "5.bias"):
            cols.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    Js = J[:, torch.cat(cols)]
    for method in METHODS:
        xi = per_example_gram(model, x, y, method=method, params=["0.weight", "5.bias"])
        torch.testing.assert_close(xi, Js @ Js.T, rtol=0, atol=1e-10)
    assert len(names) == 6


def test_batchnorm_batch_statistics_use_the_coupled_materialised_path():
    model, x, y = _case("cnn_bn")
    model.train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    engine = GramEngine(model, chunk_size=4)
    assert engine.method.value == "materialize" and engine.coupled
    assert "batch statistics" in engine.fallback_reason
    xi = engine.grams(x, y, 6)
    for b in range(2):
        s = slice(6 * b, 6 * b + 6)
        J = dense_jacobian(model, x[s], y[s])  # each block of 6 is one BatchNorm batch
        torch.testing.assert_close(xi[b], J @ J.T, rtol=0, atol=1e-10)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), f"buffer {k} changed"
    with pytest.raises(UsageError, match="batch statistics"):
        GramEngine(model, method="ghost")


@pytest.mark.parametrize("cls, reason", [(Tied, "same tensor"), (Functional, "outside")])
def test_auto_falls_back_to_materialised_with_a_reason(cls, reason):
    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(6, 4, dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    engine = GramEngine(model)
    xi = engine.grams(x, y)[0]
    assert engine.method.value == "materialize"
    assert reason in engine.fallback_reason
    J = dense_jacobian(model, x, y)
    torch.testing.assert_close(xi, J @ J.T, rtol=0, atol=1e-10)
    with pytest.raises(UsageError):
        GramEngine(model, method="ghost").grams(x, y)


def test_float64_head_keeps_confident_gradients():
    """A float32 network with the head in float64 matches the float64 Gram entry by entry."""
    model, x, _ = _case("mlp_tanh")
    with torch.no_grad():
        model[-1].weight.mul_(300.0)  # very confident outputs ...
        z = model(x)
        y = z.argmax(dim=1)  # ... that are right
    one_minus_p = -torch.expm1(-cross_entropy(z, y))
    assert (one_minus_p < 2**-24).sum() >= 3  # 1 - p(y|x) below float32's resolution
    J = dense_jacobian(model, x, y)
    ref = J @ J.T
    xi32 = per_example_gram(model.float(), x.float(), y)
    d = ref.diagonal().sqrt()
    assert (d.min() / d.max()) < 1e-6  # graded: some gradients are tiny
    rel = (xi32 - ref).abs() / torch.outer(d, d)
    assert rel.max() < 1e-4  # float32 weights and activations: relative, not absolute, errors
    xi_head32 = per_example_gram(model.float(), x.float(), y, head_dtype=torch.float32)
    assert ((xi_head32 - ref).abs() / torch.outer(d, d)).max() > 0.1  # the float32 head fails


def test_bad_arguments():
    model, x, y = _case("mlp_tanh")
    with pytest.raises(UsageError, match="method"):
        GramEngine(model, method="fast")
    with pytest.raises(UsageError, match="chunk_size"):
        GramEngine(model, chunk_size=0)
    with pytest.raises(ValueError, match="blocks"):
        per_example_grams(model, x, y, 5)


# ---------------------------------------------------------------- spectra


def test_spectrum_of_a_graded_matrix():
    g = torch.Generator().manual_seed(0)
    n = 30
    A = torch.randn(n, 2 * n, generator=g, dtype=F64)
    C = A @ A.T / (2 * n)
    d = torch.logspace(-9, 0, n, dtype=F64)  # condition of D C D ~ 1e18, of C ~ 30
    xi = d[:, None] * C * d[None, :]
    s = gram_spectrum(xi)
    expected = torch.logdet(C) + 2 * d.log().sum()
    assert not s.singular.item() and s.rank.item() == n
    assert abs(s.logdet.item() - expected.item()) < 1e-10 * abs(expected.item())
    assert math.isclose(s.trace.item(), xi.trace().item(), rel_tol=1e-14)
    assert math.isclose(s.frobenius_sq.item(), (xi**2).sum().item(), rel_tol=1e-14)
    assert math.isclose(s.lam_max.item(), torch.linalg.eigvalsh(xi)[-1].item(), rel_tol=1e-12)
    # λ_min of a graded matrix: 1/λ_max(ξ⁻¹) with ξ⁻¹ = D⁻¹ C⁻¹ D⁻¹ formed exactly here
    inv = (1 / d)[:, None] * torch.linalg.inv(C) * (1 / d)[None, :]
    lam_min = 1 / torch.linalg.eigvalsh(inv)[-1]
    assert math.isclose(s.lam_min.item(), lam_min.item(), rel_tol=1e-8)
    assert s.cond.item() > 1e15


def test_spectrum_reports_singular_matrices():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(6, 4, generator=g, dtype=F64)  # N' > W: rank 4
    dup = torch.randn(5, 50, generator=g, dtype=F64)
    dup[4] = dup[1]  # a duplicated example: rank 4
    zero = torch.randn(5, 50, generator=g, dtype=F64)
    zero[2] = 0  # an example with zero gradient: rank 4
    for rows, rank in ((J, 4), (dup, 4), (zero, 4)):
        s = gram_spectrum(rows @ rows.T)
        assert s.singular.item() and s.logdet.item() == -math.inf
        assert s.rank.item() == rank
        assert s.cond.item() == math.inf and s.lam_min.item() == 0


def test_float32_rows_near_duplicates_are_singular():
    """Rows that agree to float32 precision are one example: the tolerance uses the rows' eps."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 200, generator=g, dtype=F64)
    rows[4] = rows[1] * (1 + 1e-7 * torch.randn(200, generator=g, dtype=F64))
    xi = rows @ rows.T
    assert not gram_spectrum(xi).singular.item()  # exact float64 rows: fine
    s = gram_spectrum(xi, row_eps=torch.finfo(torch.float32).eps)
    assert s.singular.item() and s.rank.item() == 4
