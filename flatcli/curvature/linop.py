"""The linear-operator protocol every curvature consumer speaks, and a dense operator for tests.

A curvature matrix of a network (Hessian, GGN, Fisher) is never formed: it is a symmetric
operator that multiplies vectors. Every algorithm in :mod:`flatcli.curvature` (Lanczos, trace
and diagonal estimators, spectral density) takes any object with the attributes of
:class:`LinearOperator`, and counts its cost in products (``matvecs``).

The algorithms keep their own vectors in float64 and cast at the boundary
(:func:`apply_float64`), so a float32 operator still gets a float64 Krylov basis and float64
sums.

>>> import torch
>>> op = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
>>> op.matvec(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
[2.0, 1.0]
>>> op.matmat(torch.eye(2, dtype=torch.float64)).shape, op.matvecs
(torch.Size([2, 2]), 3)
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "Difference",
    "apply_float64",
    "work_device",
    "random_vectors",
    "to_dense",
]


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on ``R^dim`` known only through its products.

    Attributes:
        dim: size of the vectors it acts on.
        dtype: dtype its products expect and return.
        device: device its products expect and return.
        matvecs: products computed so far (a ``matmat`` of k columns adds k).
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    matvecs: int

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape ``(dim,)``."""
        ...

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(dim, k)``."""
        ...


class DenseOperator:
    """An explicit square matrix as a :class:`LinearOperator` that counts its products.

    The algorithms assume a symmetric matrix; this class does not check it.

    Args:
        matrix: ``(dim, dim)`` tensor; its dtype and device are the operator's.

    Raises:
        ValueError: the matrix is not square.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Operator must be square. Got shape {tuple(matrix.shape)}.")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape ``(dim,)``; counts one product."""
        if v.shape != (self.dim,):
            raise ValueError(f"Expected a vector of shape ({self.dim},). Got {tuple(v.shape)}.")
        self.matvecs += 1
        return self.matrix @ v

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(dim, k)``; counts k products."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"Expected a matrix of shape ({self.dim}, k). Got {tuple(V.shape)}.")
        self.matvecs += int(V.shape[1])
        return self.matrix @ V

    def __repr__(self) -> str:
        return f"DenseOperator(dim={self.dim}, dtype={self.dtype}, device={self.device})"


class Difference:
    """``A − B`` of two operators on the same vectors, as a :class:`LinearOperator`.

    A product costs one of each; ``matvecs`` counts products of the difference. The difference
    is data-parallel when A is (its probes are then broadcast like A's).
    """

    def __init__(self, a: LinearOperator, b: LinearOperator) -> None:
        if a.dim != b.dim:
            raise ValueError(f"Operators of sizes {a.dim} and {b.dim} cannot be subtracted.")
        self.a, self.b = a, b
        self.dim, self.dtype, self.device = a.dim, a.dtype, a.device
        self.data_parallel = bool(getattr(a, "data_parallel", False))
        self.matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        """``A v − B v`` for ``v`` of shape ``(dim,)``; counts one product."""
        self.matvecs += 1
        return self.a.matvec(v) - self.b.matvec(v)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V − B V`` for ``V`` of shape ``(dim, k)``; counts k products."""
        self.matvecs += int(V.shape[1])
        return self.a.matmat(V) - self.b.matmat(V)


def work_device(op: LinearOperator) -> torch.device:
    """Where the algorithms keep their float64 vectors: the operator's device (CPU for MPS,
    which has no float64)."""
    device = torch.device(op.device)
    return torch.device("cpu") if device.type == "mps" else device


def apply_float64(op: LinearOperator, V: Tensor) -> Tensor:
    """``A V`` in float64 on :func:`work_device`, for ``V`` of shape ``(dim,)`` or ``(dim, k)``.

    ``V`` is cast to the operator's dtype and device on the way in and the product back to
    float64 on the way out: the only place where precision is exchanged.
    """
    Vop = V.to(device=op.device, dtype=op.dtype)
    out = op.matvec(Vop) if V.dim() == 1 else op.matmat(Vop)
    return out.to(device=work_device(op), dtype=torch.float64)


def random_vectors(
    dim: int,
    count: int,
    generator: torch.Generator,
    kind: Literal["rademacher", "gaussian"] = "rademacher",
    device: torch.device | str = "cpu",
) -> Tensor:
    """``(dim, count)`` float64 random vectors: Rademacher (entries ±1) or standard Gaussian.

    Drawn on the CPU from ``generator`` (then moved), so a seed gives the same vectors on
    every device, and probe ``i`` of a stream does not depend on how the probes are blocked.
    """
    # drawn probe by probe (rows), so probe i does not depend on how probes are blocked
    if kind == "rademacher":
        out = torch.randint(0, 2, (count, dim), generator=generator, dtype=torch.int8)
        out = out.to(torch.float64).mul_(2.0).sub_(1.0)
    elif kind == "gaussian":
        out = torch.randn((count, dim), generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"kind must be 'rademacher' or 'gaussian'. Got {kind!r}.")
    return out.T.contiguous().to(device)


def to_dense(op: LinearOperator, block: int = 64) -> Tensor:
    """The ``(dim, dim)`` float64 matrix of ``op``, built ``block`` columns at a time (costs
    ``dim`` products: for tests and small problems only)."""
    dev = work_device(op)
    cols = []
    for start in range(0, op.dim, block):
        stop = min(op.dim, start + block)
        E = torch.zeros(op.dim, stop - start, dtype=torch.float64, device=dev)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        cols.append(apply_float64(op, E))
    return torch.cat(cols, dim=1)
