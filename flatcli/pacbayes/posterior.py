r"""Gaussian posteriors diagonal in the standard basis or in each layer's K-FAC eigenbasis.

A :class:`Basis` holds, for some weight tensors W⁽ᵖ⁾ (reshaped to m × n), orthogonal matrices
U⁽ᵖ⁾ (m × m) and V⁽ᵖ⁾ (n × n): the eigenvectors of E[M] and E[xxᵀ] of that layer's
Kronecker-factored Hessian. ToHessian and ToStandard of Wu et al. 2020 (Appendix F,
Eqs. 47-48) are then, per layer, two small matrix products

    ToHessian:  W′ = Uᵀ W V,        ToStandard:  W = U W′ Vᵀ,

never a dense P × P rotation. Tensors without a pair (biases, and all parameters of the
standard basis) pass unchanged. Leading batch dimensions (several weight samples) broadcast.

The posterior Q = N(w, R diag(s) Rᵀ) is parametrised as Algorithm 1 of Wu et al. 2020:
a mean w in the standard basis, ς with s = exp(2ς) in the basis coordinates, and ρ with
λ = exp(2ρ) for the prior N(w₀, λI). A sample is w′ = w + ToStandard(ξ ⊙ exp(ς)), ξ ~ N(0, I).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flatcli.errors import MeasureError

__all__ = ["Basis", "LayerBasis", "kfac_basis", "project_variances"]


@dataclass(frozen=True)
class LayerBasis:
    """The eigenbasis of one weight tensor: ``U`` (m, m) and ``V`` (n, n), both orthogonal.

    ``shape`` is the tensor's own shape (e.g. (m, C, k, k) for a convolution; its m × n
    matrix form is PyTorch's ``weight.reshape(m, -1)``).
    """

    U: Tensor
    V: Tensor
    shape: tuple[int, ...]

    def to_hessian(self, w: Tensor) -> Tensor:
        """Uᵀ Mat(w) V (Eq. 47), returned in the tensor's shape; leading dims broadcast."""
        lead = w.shape[: w.dim() - len(self.shape)]
        mat = w.reshape(*lead, self.U.shape[0], self.V.shape[0])
        return (self.U.transpose(0, 1) @ mat @ self.V).reshape(*lead, *self.shape)

    def to_standard(self, v: Tensor) -> Tensor:
        """U Mat(v) Vᵀ (Eq. 48), returned in the tensor's shape; leading dims broadcast."""
        lead = v.shape[: v.dim() - len(self.shape)]
        mat = v.reshape(*lead, self.U.shape[0], self.V.shape[0])
        return (self.U @ mat @ self.V.transpose(0, 1)).reshape(*lead, *self.shape)


@dataclass(frozen=True)
class Basis:
    """Per-layer eigenbases keyed by parameter name (e.g. ``"fc1.weight"``); empty = standard."""

    layers: Mapping[str, LayerBasis] = field(default_factory=dict)

    @property
    def is_standard(self) -> bool:
        """True when no tensor is rotated (the vanilla posterior of Dziugaite & Roy 2017)."""
        return not self.layers

    def to_hessian(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """ToHessian (Wu et al. 2020, Eq. 47) applied tensor by tensor."""
        return {
            k: self.layers[k].to_hessian(t) if k in self.layers else t for k, t in tensors.items()
        }

    def to_standard(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """ToStandard (Wu et al. 2020, Eq. 48) applied tensor by tensor."""
        return {
            k: self.layers[k].to_standard(t) if k in self.layers else t for k, t in tensors.items()
        }

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Basis:
        """The same basis with U, V cast (e.g. float64 eigenvectors to a float32 model)."""
        return Basis(
            {
                k: LayerBasis(
                    lb.U.to(device=device, dtype=dtype),
                    lb.V.to(device=device, dtype=dtype),
                    lb.shape,
                )
                for k, lb in self.layers.items()
            }
        )


def project_variances(variances: Mapping[str, Tensor], old: Basis, new: Basis) -> dict[str, Tensor]:
    """The diagonal, in ``new``, of the covariance that is diagonal with ``variances`` in ``old``.

    For a layer with W′_old = U_oldᵀ W V_old and W′_new = A W′_old B, A = U_newᵀ U_old,
    B = V_oldᵀ V_new, the coordinate variances are Var(W′_new) = (A∘A) S (B∘B) (∘ the
    elementwise product, S the old variances as an m × n matrix): again two small products.
    This is how the iterative-Hessian method (Wu et al. 2020, Algorithm 1, HESSIANCALC every
    η epochs) carries the posterior variances into a recomputed basis. The trace (Σ s) is kept,
    and the diagonal's log-determinant is at least the old one (Hadamard), so KL(Q‖P) does
    not grow.
    """
    out: dict[str, Tensor] = {}
    for k, s in variances.items():
        lo, ln = old.layers.get(k), new.layers.get(k)
        if lo is None and ln is None:
            out[k] = s
            continue
        ref = lo if lo is not None else ln
        assert ref is not None
        m, n = ref.U.shape[0], ref.V.shape[0]
        eye_m = torch.eye(m, dtype=s.dtype, device=s.device)
        eye_n = torch.eye(n, dtype=s.dtype, device=s.device)
        u_old, v_old = (lo.U, lo.V) if lo is not None else (eye_m, eye_n)
        u_new, v_new = (ln.U, ln.V) if ln is not None else (eye_m, eye_n)
        a = (u_new.transpose(0, 1) @ u_old).square()
        b = (v_old.transpose(0, 1) @ v_new).square()
        out[k] = (a @ s.reshape(m, n) @ b).reshape(s.shape)
    return out


def kfac_basis(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    fisher: str = "exact",
) -> Basis:
    """Each Linear/Conv2d weight's K-FAC eigenbasis (U of E[M], V of E[xxᵀ]) at ``model``'s weights.

    The layer-wise Hessian is approximated as E[M] ⊗ E[xxᵀ] (Wu et al. 2020, Eq. 6); its
    eigenvectors are u_i ⊗ v_j, so the eigenbasis of Mat(w) is (U, V) (Appendix F). U and V
    are float64 from a symmetric eigendecomposition, re-orthonormalised by a QR step.
    """
    from flatcli.curvature.kfac import kfac_factors

    factors = kfac_factors(model, x, y, fisher=fisher, batch_size=batch_size, seed=seed)
    params = dict(model.named_parameters())
    layers: dict[str, LayerBasis] = {}
    for name, lf in factors.items():
        key = f"{name}.weight" if name else "weight"
        if key not in params:
            raise MeasureError(f"K-FAC layer {name!r} has no weight parameter {key!r}")
        _, u, _, v = lf.eig()
        u = _orthonormal(u.to(torch.float64))
        v = _orthonormal(v.to(torch.float64))
        shape = tuple(params[key].shape)
        if u.shape[0] * v.shape[0] != params[key].numel():
            raise MeasureError(
                f"K-FAC factors of {name!r} ({u.shape[0]} x {v.shape[0]}) do not match its "
                f"weight of shape {list(shape)}"
            )
        layers[key] = LayerBasis(u, v, shape)
    if not layers:
        raise MeasureError(
            "the model has no Linear or Conv2d layer: there is no K-FAC eigenbasis; "
            "use --method vanilla"
        )
    return Basis(layers)


def _orthonormal(q: Tensor) -> Tensor:
    """Q of a QR step with signs fixed so that diag(R) > 0: orthonormal to float64 rounding."""
    qq, r = torch.linalg.qr(q)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return qq * signs
