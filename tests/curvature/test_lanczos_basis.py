"""The Krylov basis dtype of Lanczos (issue #23, item 6: a 124M-parameter model in 8 GB) and the
parameter-sized temporaries of one curvature product.

A float32 operator on a huge model gets a float32 basis (half the memory of the float64 one),
still fully reorthogonalised with float64 sums; these tests pin the rule, the dtype actually
allocated, its accuracy against dense float64 truth, and the memory of one product.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from flatcli.curvature import _autodiff
from flatcli.curvature.lanczos import (
    choose_basis_dtype,
    lanczos,
    lanczos_memory,
    lanczos_quadrature,
)
from flatcli.curvature.linop import DenseOperator
from flatcli.curvature.operators import _owned, make_operator
from tests.references import peak_cpu_bytes

lanczos_module = importlib.import_module("flatcli.curvature.lanczos")  # not the function

GPT2_SMALL = 124_439_808


def _spy_basis(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtype of every basis :class:`_Lanczos` allocates from now on."""
    dtypes: list[torch.dtype] = []
    init = lanczos_module._Lanczos.__init__

    def spy(self, op, capacity, *args):
        init(self, op, capacity, *args)
        dtypes.append(self.V.dtype)

    monkeypatch.setattr(lanczos_module._Lanczos, "__init__", spy)
    return dtypes


def test_choose_basis_dtype_rule() -> None:
    # GPT-2 small, 4 steps: 5 rows of 124M float64 numbers (5 GB) exceed the 2 GiB cap
    assert choose_basis_dtype(torch.float32, GPT2_SMALL, 5) == torch.float32
    assert choose_basis_dtype(torch.bfloat16, GPT2_SMALL, 5) == torch.float32
    # a float64 operator keeps a float64 basis whatever it costs
    assert choose_basis_dtype(torch.float64, GPT2_SMALL, 5) == torch.float64
    # LeNet-5, 100 steps: 50 MB
    assert choose_basis_dtype(torch.float32, 61_706, 101) == torch.float64
    # below the cap but above the memory budget
    assert choose_basis_dtype(torch.float32, 10_000, 101, budget_bytes=10**6) == torch.float32
    assert choose_basis_dtype(torch.float32, 10_000, 101, budget_bytes=10**8) == torch.float64


def test_lanczos_memory_counts_the_basis_dtype() -> None:
    f64 = lanczos_memory(GPT2_SMALL, 1, 4)
    f32 = lanczos_memory(GPT2_SMALL, 1, 4, basis_dtype=torch.float32)
    auto = lanczos_memory(GPT2_SMALL, 1, 4, basis_dtype="auto")
    assert f64.vectors == f32.vectors == 5
    assert f64.bytes == 5 * GPT2_SMALL * 8 and f32.bytes == 5 * GPT2_SMALL * 4
    assert auto == f32  # a float32 model of that size: float32 rows
    assert lanczos_memory(1000, 10, basis_dtype="auto").bytes == lanczos_memory(1000, 10).bytes


def test_auto_basis_is_float32_only_when_the_float64_one_does_not_fit(monkeypatch) -> None:
    dtypes = _spy_basis(monkeypatch)
    A = torch.diag(torch.arange(1.0, 51.0)).float()
    lanczos(DenseOperator(A), k=2, tol=1e-5)
    lanczos(DenseOperator(A.double()), k=2, tol=1e-10)
    monkeypatch.setattr(lanczos_module, "BASIS_MEMORY_BYTES", 8 * 50)  # one row: too small
    lanczos(DenseOperator(A), k=2, tol=1e-5, max_basis=20)
    lanczos(DenseOperator(A.double()), k=2, tol=1e-10, max_basis=20)
    lanczos_quadrature(DenseOperator(A), torch.ones(50), 5)
    lanczos(DenseOperator(A), k=2, tol=1e-5, max_basis=20, basis_dtype="float64")
    assert dtypes == [torch.float64] * 2 + [torch.float32, torch.float64, torch.float32] + [
        torch.float64
    ]
    with pytest.raises(ValueError, match="basis_dtype"):
        lanczos(DenseOperator(A), k=2, basis_dtype="float16")


def test_float32_basis_is_exact_on_a_known_spectrum() -> None:
    """Full reorthogonalisation with float64 sums over a float32 basis: every eigenvalue of a
    diagonal float32 matrix (exactly representable) to float32 rounding, through thick restarts,
    and unit Ritz vectors orthogonal to ~1e-6."""
    n = 200
    A = torch.diag(torch.linspace(1.0, 100.0, n)).float()
    truth = torch.linspace(1.0, 100.0, n, dtype=torch.float64)
    res = lanczos(
        DenseOperator(A), k=5, tol=1e-6, max_basis=30, return_vectors=True, basis_dtype="float32"
    )
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, truth.flip(0)[:5], rtol=0, atol=1e-4)
    X = res.eigenvectors.double()
    torch.testing.assert_close(X.T @ X, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-6)


def _net() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))
    return model, x, y


def test_float32_basis_matches_dense_float64_hessian() -> None:
    """A float32 Hessian operator of a tiny MLP (180 parameters): the top 3 eigenvalues with a
    float32 basis against the dense float64 Hessian at the same (float32-rounded) weights.

    Tolerance 1e-4 |λ_max|: a float32 product carries relative errors of about 1e-6 (sums of a
    few hundred float32 terms, the float64 head aside), and the eigenvalues a residual tolerance
    of 1e-6 |λ_max|; 1e-4 leaves two orders of margin and is far below what a float32 basis
    without float64 sums or reorthogonalisation would give on a clustered spectrum. The float64
    basis on the same operator is held to the same bound, and the two bases agree to 1e-5."""
    model64, x, y = _net()
    model32 = _net()[0].float()
    with torch.no_grad():  # the float64 truth at exactly the float32 weights
        for p64, p32 in zip(model64.parameters(), model32.parameters(), strict=True):
            p64.copy_(p32.double())
    dense = make_operator("hessian", model64, x, y, loss_fn="ce").to_dense().double()
    truth = torch.linalg.eigvalsh(dense).flip(0)[:3]
    op = make_operator("hessian", model32, x.float(), y, loss_fn="ce", head_dtype=torch.float64)
    got32 = lanczos(op, k=3, tol=1e-6, basis_dtype="float32")
    got64 = lanczos(op, k=3, tol=1e-6, basis_dtype="float64")
    scale = float(truth.abs().max())
    for got in (got32, got64):
        assert got.converged
        torch.testing.assert_close(got.eigenvalues, truth, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(got32.eigenvalues, got64.eigenvalues, rtol=0, atol=1e-5 * scale)


# ---- one product's parameter-sized temporaries -------------------------------------------------


def test_one_hessian_product_holds_two_parameter_sized_tensors() -> None:
    """A product on a model whose parameters dwarf its activations (one 400 x 400 Linear, 2
    examples) allocates two parameter-sized tensors at its peak: autograd's result and the
    flat product it is copied into; with two chunks, three (the sum, a chunk's result, the
    flat product). Zeros for every input, a stacked copy of the column, a copy of the first
    chunk, a divided copy and a concatenated copy made that 3 and 5 (measured before the
    fix)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 400), nn.Tanh(), nn.Linear(400, 2)).eval()
    x, y = torch.randn(2, 400), torch.randint(0, 2, (2,))
    for batch_size, most in ((2, 2.3), (1, 3.3)):
        op = make_operator("hessian", model, x, y, loss_fn="ce", batch_size=batch_size)
        v = torch.randn(op.dim)
        op.matvec(v)  # the graphs are built and cached
        peak = peak_cpu_bytes(lambda op=op, v=v: op.matvec(v))
        assert 1.0 < peak / (op.dim * 4) <= most, (batch_size, peak / (op.dim * 4))


def test_backward_products_columns_and_unreached_inputs() -> None:
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = (a * a).sum() * b
    cols = torch.randn(3, 3, dtype=torch.float64)
    one = _autodiff.backward_products([out], [a, b, unused], [cols[:1]], batched=False)
    loop = _autodiff.backward_products([out], [a, b, unused], [cols], batched=False)
    vmapped = _autodiff.backward_products([out], [a, b, unused], [cols], batched=True)
    for j in range(3):
        ga, gb = torch.autograd.grad(out, [a, b], cols[j], retain_graph=True)
        torch.testing.assert_close(loop[0][j], ga)
        torch.testing.assert_close(loop[1][j], gb)
    for got in (loop, vmapped):
        assert got[2].shape == (3, 4) and not got[2].any()
    torch.testing.assert_close(one[0], loop[0][:1])
    assert one[0].shape == (1, 5) and one[2].shape == (1, 4) and not one[2].any()


def test_owned_copies_what_a_sum_may_not_be_written_into() -> None:
    vec = torch.randn(6)
    shared = torch.randn(4)
    mine = torch.randn(1, 3)
    part = {
        "input": vec[:3].view(1, 3),  # a view of a protected tensor (the product's input)
        "x": shared.view(1, 4),
        "y": shared.view(1, 4),  # one gradient handed to two inputs
        "expanded": torch.randn(1, 1).expand(1, 5),  # stride 0
        "own": mine,
    }
    got = _owned(part, {vec.untyped_storage().data_ptr()})
    assert got["own"] is mine
    ptrs = [t.untyped_storage().data_ptr() for t in got.values()]
    assert len(set(ptrs)) == len(ptrs) and vec.untyped_storage().data_ptr() not in ptrs
    assert all(t.is_contiguous() for t in got.values())
    for name in part:
        torch.testing.assert_close(got[name], part[name])
