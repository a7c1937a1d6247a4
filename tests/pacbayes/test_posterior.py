"""ToHessian/ToStandard (Wu et al. 2020, Eqs. 47-48) against dense rotations; KL invariance."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from flatcli.pacbayes.kl import gaussian_kl_isotropic
from flatcli.pacbayes.posterior import Basis, LayerBasis, project_variances

F64 = torch.float64
SHAPES = {"a.weight": (3, 4), "a.bias": (3,), "conv.weight": (2, 2, 1, 3)}


def _orth(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q


def _basis(seed: int = 0) -> Basis:
    return Basis(
        {
            "a.weight": LayerBasis(_orth(3, seed), _orth(4, seed + 1), (3, 4)),
            "conv.weight": LayerBasis(_orth(2, seed + 2), _orth(6, seed + 3), (2, 2, 1, 3)),
        }
    )


def _tensors(seed: int, lead: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*lead, *s, generator=g, dtype=F64) for k, s in SHAPES.items()}


def _flat(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t[k].reshape(-1) for k in SHAPES])


def _unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, s in SHAPES.items():
        n = math.prod(s)
        out[k] = v[i : i + n].reshape(s)
        i += n
    return out


def _dense(basis: Basis) -> torch.Tensor:
    """The P × P matrix of ToStandard, column by column (only for this test)."""
    p = sum(math.prod(s) for s in SHAPES.values())
    eye = torch.eye(p, dtype=F64)
    return torch.stack([_flat(basis.to_standard(_unflat(eye[i]))) for i in range(p)], dim=1)


def test_to_standard_after_to_hessian_is_the_identity():
    basis, t = _basis(), _tensors(5)
    back = basis.to_standard(basis.to_hessian(t))
    for k in SHAPES:
        torch.testing.assert_close(back[k], t[k], rtol=0, atol=1e-14)
    there = basis.to_hessian(basis.to_standard(t))
    for k in SHAPES:
        torch.testing.assert_close(there[k], t[k], rtol=0, atol=1e-14)


def test_rotation_is_block_kronecker_and_orthogonal():
    basis = _basis()
    r = _dense(basis)
    torch.testing.assert_close(r.T @ r, torch.eye(r.shape[0], dtype=F64), rtol=0, atol=1e-13)
    # row-major vec: vec(U W' Vᵀ) = (U ⊗ V) vec(W'), per layer; the bias passes unchanged
    lb = basis.layers["a.weight"]
    torch.testing.assert_close(r[:12, :12], torch.kron(lb.U, lb.V), rtol=0, atol=1e-14)
    torch.testing.assert_close(r[12:15, 12:15], torch.eye(3, dtype=F64))
    lc = basis.layers["conv.weight"]
    torch.testing.assert_close(r[15:, 15:], torch.kron(lc.U, lc.V), rtol=0, atol=1e-14)
    # ToHessian is the transpose (Eq. 47: W' = Uᵀ W V)
    t = _tensors(9)
    torch.testing.assert_close(_flat(basis.to_hessian(t)), r.T @ _flat(t), rtol=0, atol=1e-13)


def test_leading_sample_dimensions_broadcast():
    basis, t = _basis(), _tensors(3, lead=(5,))
    out = basis.to_standard(t)
    for i in range(5):
        one = basis.to_standard({k: v[i] for k, v in t.items()})
        for k in SHAPES:
            torch.testing.assert_close(out[k][i], one[k], rtol=0, atol=1e-14)


def test_kl_is_unchanged_by_the_per_layer_eigenbasis():
    """KL(N(w, R diag(s) Rᵀ) ‖ N(w0, λI)) from torch.distributions equals the closed form."""
    basis = _basis(4)
    r = _dense(basis)
    p = r.shape[0]
    w, w0 = _flat(_tensors(1)), _flat(_tensors(2))
    g = torch.Generator().manual_seed(3)
    s = torch.rand(p, generator=g, dtype=F64) * 0.5 + 0.05
    lam = 0.3
    prior = MultivariateNormal(w0, covariance_matrix=lam * torch.eye(p, dtype=F64))
    rotated = kl_divergence(MultivariateNormal(w, covariance_matrix=r @ torch.diag(s) @ r.T), prior)
    standard = kl_divergence(MultivariateNormal(w, covariance_matrix=torch.diag(s)), prior)
    closed = gaussian_kl_isotropic((w - w0).square().sum(), s.sum(), s.log().sum(), p, lam)
    assert float(rotated) == pytest.approx(float(closed), rel=1e-10)
    assert float(standard) == pytest.approx(float(closed), rel=1e-10)


def test_samples_have_the_rotated_covariance():
    """ToStandard(ξ ⊙ σ) has covariance R diag(σ²) Rᵀ (checked against the dense R)."""
    basis = _basis(7)
    r = _dense(basis)
    sigma = _tensors(11)
    sigma = {k: v.abs() + 0.1 for k, v in sigma.items()}
    g = torch.Generator().manual_seed(0)
    n = 20000
    xi = {k: torch.randn(n, *s, generator=g, dtype=F64) for k, s in SHAPES.items()}
    samples = basis.to_standard({k: xi[k] * sigma[k] for k in SHAPES})
    flat = torch.cat([samples[k].reshape(n, -1) for k in SHAPES], dim=1)
    emp = flat.T @ flat / n
    ref = r @ torch.diag(_flat(sigma).square()) @ r.T
    # entries of a sample covariance have standard error about sqrt(2/n)·scale
    assert float((emp - ref).abs().max()) < 6 * math.sqrt(2.0 / n) * float(ref.diagonal().max())


def test_project_variances_is_the_diagonal_of_the_rotated_covariance():
    old, new = _basis(1), _basis(20)
    s = {k: v.abs() + 0.01 for k, v in _tensors(4).items()}
    got = _flat(project_variances(s, old, new))
    r_old, r_new = _dense(old), _dense(new)
    cov = r_old @ torch.diag(_flat(s)) @ r_old.T
    ref = torch.diagonal(r_new.T @ cov @ r_new)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert float(got.sum()) == pytest.approx(float(_flat(s).sum()), rel=1e-12)  # trace kept
    # from the standard basis (vanilla) into an eigenbasis, too
    got_std = _flat(project_variances(s, Basis(), new))
    ref_std = torch.diagonal(r_new.T @ torch.diag(_flat(s)) @ r_new)
    torch.testing.assert_close(got_std, ref_std, rtol=1e-12, atol=1e-14)
